"""Spans: what each hop of a chat records, joined into one trace by W3C trace context.

Not the OpenTelemetry SDK, on purpose: on this project's 2-core VM its span cost ~19 us to start
and end and ~16-22 us to encode (SDK 1.45, a span with seven attributes), and a chat makes several,
where the mesh's whole CPU per chat is ~1.2 ms. These spans are plain slotted objects (~0.3 us to
make), written straight to OTLP's wire format when they end (wire.py, 3-5 us). What they carry
follows OpenTelemetry's data model and conventions, so every OTLP backend reads them as its own.

There is one tracer per process, set by `install` at startup; none (`TRACER` None) when tracing
is off, and then every function here returns at once. The span a hop runs in is a context
variable: a server span is made current by the error mapping (errors.py) for the call's handler,
and `span(...)` makes an inner one current for a `with` block. Client spans are never current:
nothing runs inside them in this process; the server they call gets them as its parent through
the `traceparent` metadata.
"""

from __future__ import annotations

import contextvars
import random
import re
import time
import typing

SERVER, CLIENT, INTERNAL = 2, 3, 1  # OTLP's Span.SpanKind numbers
STATUS_ERROR = 2  # OTLP's Status.StatusCode number
TRACEPARENT = "traceparent"

_random = random.Random()
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z")


class Span:
    """One operation: a call served, a call made, a model asked. `recording` False for a span of
    an unsampled trace: it still carries the ids on to the next hop, and records nothing."""

    __slots__ = (
        "trace_id",
        "span_id",
        "parent_id",
        "name",
        "kind",
        "service",
        "start_ns",
        "end_ns",
        "attributes",
        "events",
        "status",
        "status_message",
        "recording",
    )

    def __init__(self, trace_id: int, parent_id: int, name: str, kind: int, service: str, recording: bool):
        self.trace_id = trace_id
        self.span_id = _random.getrandbits(64) or 1
        self.parent_id = parent_id
        self.name = name
        self.kind = kind
        self.service = service
        self.start_ns = time.time_ns()
        self.end_ns = 0
        self.attributes: dict[str, typing.Any] = {}
        self.events: list[tuple[str, int, dict]] = []
        self.status = 0
        self.status_message = ""
        self.recording = recording

    def set(self, key: str, value) -> None:
        if self.recording:
            self.attributes[key] = value

    def update(self, attributes: dict) -> None:
        if self.recording:
            self.attributes.update(attributes)

    def event(self, name: str, attributes: dict | None = None) -> None:
        if self.recording:
            self.events.append((name, time.time_ns(), attributes or {}))

    def fail(self, message: str) -> None:
        self.status, self.status_message = STATUS_ERROR, message[:512]

    def end(self) -> None:
        """Finished: handed to the exporter once (a second end is ignored)."""
        if self.end_ns:
            return
        self.end_ns = time.time_ns()
        if self.recording and TRACER is not None:
            TRACER.exporter.add(self)

    @property
    def traceparent(self) -> str:
        """This span as the parent of the next hop's (W3C Trace Context, version 00)."""
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{'01' if self.recording else '00'}"


class RemoteParent(typing.NamedTuple):
    """A parent span of another process, read from a `traceparent` header."""

    trace_id: int
    span_id: int
    sampled: bool


def parse_traceparent(value: str) -> RemoteParent | None:
    """The parent in a W3C `traceparent` (00-<32 hex>-<16 hex>-<2 hex>), or None for one that is
    malformed or has an all-zero id (the spec says: then start a new trace)."""
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    return RemoteParent(trace_id, span_id, bool(int(flags_hex, 16) & 1))


class Tracer:
    """This process's tracer: the sampler's decision for a new trace, and the exporter."""

    def __init__(self, settings, exporter, default_service: str):
        self.exporter = exporter
        self.default_service = default_service
        self.parent_based = settings.parent_based
        # A root is kept when its trace id's low 64 bits fall under this bound (the spec's
        # TraceIdRatioBased: the same decision for the same trace id in every process).
        self.bound = int(settings.root_ratio * (1 << 64))

    def start(self, name: str, kind: int, parent: Span | RemoteParent | None, service: str = "") -> Span:
        if parent is None:
            trace_id = _random.getrandbits(128) or 1
            recording = (trace_id & 0xFFFFFFFFFFFFFFFF) < self.bound
            return Span(trace_id, 0, name, kind, service or self.default_service, recording)
        if isinstance(parent, Span):
            return Span(parent.trace_id, parent.span_id, name, kind, service or parent.service, parent.recording)
        recording = parent.sampled if self.parent_based else (parent.trace_id & 0xFFFFFFFFFFFFFFFF) < self.bound
        return Span(parent.trace_id, parent.span_id, name, kind, service or self.default_service, recording)


TRACER: Tracer | None = None
current: contextvars.ContextVar[Span | None] = contextvars.ContextVar("span", default=None)


class _NoSpan:
    """What `span()` gives when tracing is off: takes everything, records nothing."""

    __slots__ = ()
    recording = False

    def set(self, key, value) -> None:
        pass

    def update(self, attributes) -> None:
        pass

    def event(self, name, attributes=None) -> None:
        pass

    def fail(self, message) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


NO_SPAN = _NoSpan()


class _Current:
    """`with span(...) as s`: `s` is current inside the block and ends with it (failed by an
    exception that escapes it)."""

    __slots__ = ("span", "previous")

    def __init__(self, span: Span):
        self.span = span

    def __enter__(self) -> Span:
        self.previous = current.get()
        current.set(self.span)
        return self.span

    def __exit__(self, kind, exc, traceback) -> None:
        # set, not reset(token): a block inside an async generator may end in another context.
        current.set(self.previous)
        if exc is not None and not isinstance(exc, GeneratorExit):
            self.span.fail(f"{type(exc).__name__}: {exc}")
        self.span.end()


def span(name: str, kind: int = INTERNAL, attributes: dict | None = None):
    """A child of the current span for a `with` block; NO_SPAN when tracing is off, outside any
    chat, or in a chat that is not sampled."""
    parent = current.get()
    if parent is None or not parent.recording or TRACER is None:
        return NO_SPAN
    child = TRACER.start(name, kind, parent)
    if attributes and child.recording:
        child.attributes.update(attributes)
    return _Current(child)


def trace_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the current span, for log lines; None outside a sampled chat
    (an unsampled one has no trace to lead to)."""
    active = current.get()
    if active is None or not active.recording:
        return None
    return f"{active.trace_id:032x}", f"{active.span_id:016x}"


def recording() -> bool:
    """Whether the current span records: worth building attributes for."""
    active = current.get()
    return active is not None and active.recording


def annotate(attributes: dict) -> None:
    """Attributes on the current span (the served call's, in a handler), when it records."""
    active = current.get()
    if active is not None and active.recording:
        active.attributes.update(attributes)
