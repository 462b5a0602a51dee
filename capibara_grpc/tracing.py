"""Request ids across hops, and logs that carry them: JSON lines, or text lines on a terminal.

Envoy gives every request an `x-request-id` (a client may send its own) and passes it to the
gateway as gRPC metadata. The server interceptor puts it in a context variable; the client
interceptor on every internal channel copies it into outgoing metadata, so router, context,
inference, consensus and speech log the same id for one chat.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import pathlib
import sys
import time
import typing
import uuid

import grpc

from capibara_grpc.telemetry.spans import trace_ids

REQUEST_ID = "x-request-id"
# The caller's API key id (its name or short hash, never the key), set by the edge's guard once it
# accepted the key; capibara_grpc/api_keys.py says why. Not copied onto internal calls: each call
# from outside is counted once, by the service the edge sent it to.
KEY_ID_HEADER = "x-capibara-key-id"
# Set by the mesh's own clients on a call whose request an edge has validated already
# (capibara_grpc/chat/request.py): the service trusts it instead of checking it again. The edge's
# guard removes a client's copy, so only calls from inside the mesh carry it.
VALIDATED_HEADER = "x-capibara-validated"
VALIDATED = ((VALIDATED_HEADER, "1"),)
current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def _scan(metadata) -> tuple[str, str]:
    """(request id or '', API key id or '') of a call's invocation metadata, in one pass; the
    first of each when a header is repeated."""
    request_id = key_id = ""
    for key, value in metadata or ():
        if key == REQUEST_ID and value and not request_id:
            request_id = value[:128]
        elif key == KEY_ID_HEADER and not key_id:
            key_id = value.decode() if isinstance(value, bytes) else value
    return request_id, key_id


def ids_from(metadata) -> tuple[str, str]:
    """(request id, API key id) of a call: the request id the caller (or the edge) sent, else a
    new one; the key id '' when the mesh has no keys or the call did not come through the edge."""
    request_id, key_id = _scan(metadata)
    return request_id or uuid.uuid4().hex, key_id


def validated(metadata) -> bool:
    """Whether a call comes from inside the mesh with a request an edge validated (VALIDATED)."""
    return any(key == VALIDATED_HEADER for key, _ in metadata or ())


def key_id_from(metadata) -> str:
    """The caller's API key id in a call's invocation metadata ('' when the mesh has no keys or the
    call did not come through the edge)."""
    return _scan(metadata)[1]


def _with_request_id(client_call_details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    request_id = current_request_id.get()
    if not request_id:
        return client_call_details
    metadata = [(k, v) for k, v in (client_call_details.metadata or ()) if k != REQUEST_ID]
    metadata.append((REQUEST_ID, request_id))
    return grpc.aio.ClientCallDetails(
        client_call_details.method,
        client_call_details.timeout,
        grpc.aio.Metadata(*metadata),
        client_call_details.credentials,
        client_call_details.wait_for_ready,
    )


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_request_id(client_call_details), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_request_id(client_call_details), request)


def client_interceptors() -> list:
    return [_UnaryUnary(), _UnaryStream()]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, request id and trace and span ids (when
    there are: a chat that is sampled, whose trace exists), message."""

    def format(self, record: logging.LogRecord) -> str:
        # `capibara up` writes each record to stderr and to its log file: as JSON to both, it is
        # formatted once (the line is kept on the record).
        line = record.__dict__.get("_json_line")
        if line is None:
            line = record._json_line = self._format(record)
        return line

    def _format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        request_id = current_request_id.get()
        if request_id:
            entry["request_id"] = request_id
        if ids := trace_ids():  # the line leads to its trace (docs/tracing.md)
            entry["trace_id"], entry["span_id"] = ids
        entry["message"] = record.getMessage()
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """One readable line for a terminal: time, level, logger, message, then the structured fields
    not already in the message and the request id (when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        extras = [f"{key}={value}" for key, value in getattr(record, "fields", {}).items() if str(value) not in message]
        request_id = current_request_id.get()
        if request_id:
            extras.append(f"request_id={request_id}")
        if ids := trace_ids():
            extras.append(f"trace_id={ids[0]}")
        line = " ".join([stamp, f"{record.levelname:<7}", f"{record.name}:", message, *extras])
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


# Overrides the choice between JSON and text: `json` or `text` (default: JSON unless on a terminal).
LOG_FORMAT_ENV = "CAPIBARA_LOG_FORMAT"


def wants_json(stream: typing.TextIO) -> bool:
    """JSON lines unless `stream` is a terminal (a person reads it); $CAPIBARA_LOG_FORMAT decides first."""
    chosen = os.environ.get(LOG_FORMAT_ENV, "").strip().lower()
    if chosen in ("json", "text"):
        return chosen == "json"
    isatty = getattr(stream, "isatty", None)
    return not (isatty and isatty())


def configure_logging(
    json_lines: bool | None = None, *, stream: typing.TextIO | None = None, log_file: pathlib.Path | None = None
) -> None:
    """Log INFO and up to `stream` (stderr) as JSON lines or, for a person at a terminal, text
    lines (`json_lines` None: decided by wants_json). With `log_file`, also JSON lines there
    (appended): what a terminal shows as text stays machine-readable in the file."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    as_json = wants_json(stream) if json_lines is None else json_lines
    handler.setFormatter(JsonFormatter() if as_json else TextFormatter())
    handlers: list[logging.Handler] = [handler]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(JsonFormatter())
        handlers.append(file_handler)
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)
    # Neither format shows the caller's file and line, thread, process or task: not looking them
    # up for each record (the logging HOWTO's "Optimization") saves a stack walk and a getpid() on
    # every call's log line, which showed in the router's per-call profile. Process-wide: records
    # then carry no pathname/lineno (stack_info is ignored) for any handler.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # Python 3.12+
