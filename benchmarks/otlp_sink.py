"""An OTLP/gRPC trace collector that keeps nothing: it answers every Export and counts the spans
(benchmarks/tracing_cost.py's collector, in its own process so that its CPU is not the mesh's).

    .venv/bin/python benchmarks/otlp_sink.py PORT      # prints "sink serving" once listening
    kill -USR1 <pid>                                    # prints "spans N requests M" on stdout
"""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.spans = self.requests = 0

    async def Export(self, request, context):
        self.requests += 1
        self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


async def main(port: int) -> None:
    sink = Sink()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, lambda: print(f"spans {sink.spans} requests {sink.requests}", flush=True))
    print("sink serving", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
