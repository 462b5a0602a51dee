"""An OTLP/gRPC trace collector that keeps nothing: it answers every Export at once and counts
the spans later, when asked (benchmarks/tracing_cost.py's collector). In its own process, so its
CPU is not the mesh's; and it parses nothing while the mesh is under load, so that on a small
machine it does not take the cores the mesh is measured on (a real collector runs elsewhere).

    .venv/bin/python benchmarks/otlp_sink.py PORT      # prints "sink serving" once listening
    kill -USR1 <pid>                                    # prints "spans N requests M" on stdout
"""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
EMPTY_RESPONSE = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()


class Sink(grpc.GenericRpcHandler):
    """TraceService/Export as raw bytes: kept unparsed until counted."""

    def __init__(self):
        self.received: list[bytes] = []
        self.spans = self.requests = 0

    def service(self, handler_call_details):
        if handler_call_details.method != EXPORT:
            return None
        return grpc.unary_unary_rpc_method_handler(self.export)

    async def export(self, request: bytes, context) -> bytes:
        self.requests += 1
        self.received.append(request)
        return EMPTY_RESPONSE

    def count(self) -> str:
        for raw in self.received:
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(raw)
            self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        self.received.clear()
        return f"spans {self.spans} requests {self.requests}"


async def main(port: int) -> None:
    sink = Sink()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    server.add_generic_rpc_handlers([sink])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, lambda: print(sink.count(), flush=True))
    print("sink serving", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
