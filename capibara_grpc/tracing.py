"""Request ids across hops, and JSON logs that carry them.

Envoy gives every request an `x-request-id` (a client may send its own) and passes it to the
gateway as gRPC metadata. The server interceptor puts it in a context variable; the client
interceptor on every internal channel copies it into outgoing metadata, so router, context,
inference, consensus and speech log the same id for one chat.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
import uuid

import grpc

REQUEST_ID = "x-request-id"
current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def request_id_from(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID and value:
            return value[:128]
    return uuid.uuid4().hex


def _with_request_id(client_call_details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    request_id = current_request_id.get()
    if not request_id:
        return client_call_details
    metadata = [(k, v) for k, v in (client_call_details.metadata or ()) if k != REQUEST_ID]
    metadata.append((REQUEST_ID, request_id))
    return grpc.aio.ClientCallDetails(client_call_details.method, client_call_details.timeout,
                                      grpc.aio.Metadata(*metadata), client_call_details.credentials,
                                      client_call_details.wait_for_ready)


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_request_id(client_call_details), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_request_id(client_call_details), request)


def client_interceptors() -> list:
    return [_UnaryUnary(), _UnaryStream()]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, request id (when there is one), message."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        request_id = current_request_id.get()
        if request_id:
            entry["request_id"] = request_id
        entry["message"] = record.getMessage()
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(json_lines: bool = True) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
