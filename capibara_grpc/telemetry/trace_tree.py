"""`capibara traces`: a trace viewer in the terminal. It runs an `OtlpReceiver` and prints each
trace, once no span of it has arrived for a while (2 s), as an indented tree of its spans
(`service  name  duration`), with the attributes worth reading at a glance: the GenAI
conventions, the mesh's own `capibara.*`, gRPC and HTTP status codes, errors.

Why: to follow one chat from Envoy down to the model call on a laptop without Docker or a
collector: `capibara traces`, then run the mesh with OTEL_EXPORTER_OTLP_ENDPOINT pointed at it
and send a chat with a `traceparent`. `--json` prints each span as one JSON object instead, as it
arrives, for jq and friends. A trace whose spans come in after it was printed (a long stream's
span ends last) is printed again, whole.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import sys
import textwrap
from typing import Any, TextIO

from capibara_grpc.telemetry.receiver import OtlpReceiver, ReceivedSpan

# The attributes shown in the tree (a prefix, or a whole key).
KEY_ATTRIBUTES = (
    "gen_ai.",
    "capibara.",
    "rpc.grpc.status_code",
    "grpc.status_code",
    "http.status_code",
    "http.response.status_code",
    "error.type",
)
LOOPBACK = ("127.0.0.1", "::1", "localhost")
WIDTH = 110  # the key attributes go under the span's line when it would be longer


def _show(value: Any) -> str:
    if isinstance(value, str) and value and not any(c.isspace() for c in value):
        return value
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value, ensure_ascii=False, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"{type(value).__name__} is not JSON")


def key_attributes(span: ReceivedSpan) -> list[str]:
    return [f"{k}={_show(v)}" for k, v in span.attributes.items() if k.startswith(KEY_ATTRIBUTES)]


def _span_lines(span: ReceivedSpan, depth: int, note: str) -> list[str]:
    indent = "  " * depth
    head = f"{indent}{span.service or '?'}  {span.name}  {span.duration_ms:.1f} ms"
    if span.status_code == "ERROR":
        head += f"  ERROR{': ' + span.status_message if span.status_message else ''}"
    if note:
        head += f"  ({note})"
    shown = key_attributes(span)
    if shown and len(head) + 2 + len("  ".join(shown)) <= WIDTH:
        return [f"{head}  {'  '.join(shown)}"]
    under = indent + "    "
    lines = [head]
    if shown:
        lines += textwrap.wrap("  ".join(shown), WIDTH, initial_indent=under, subsequent_indent=under)
    for name, at, attrs in span.events:
        details = "  ".join(f"{k}={_show(v)}" for k, v in attrs.items() if k != "exception.stacktrace")
        offset = (at - span.start_unix_nano) / 1e6
        lines.append(f"{under}· {name} +{offset:.1f} ms{'  ' + details if details else ''}")
    return lines


def format_trace(spans: list[ReceivedSpan], earlier: int = 0) -> str:
    """One trace as an indented tree: children under their parent by start time; a span whose
    parent never arrived is a root, noted. `earlier`: how many spans of it were printed before."""
    if not spans:
        return ""
    ids = {s.span_id for s in spans}
    children: dict[str, list[ReceivedSpan]] = collections.defaultdict(list)
    roots = []
    for span in spans:
        if span.parent_span_id and span.parent_span_id in ids and span.parent_span_id != span.span_id:
            children[span.parent_span_id].append(span)
        else:
            roots.append(span)
    start = min(s.start_unix_nano for s in spans)
    total = (max(s.end_unix_nano for s in spans) - start) / 1e6
    again = f", again: {len(spans) - earlier} more" if earlier else ""
    lines = [f"trace {spans[0].trace_id}  {len(spans)} spans{again}, {total:.1f} ms"]
    seen: set[int] = set()

    def walk(span: ReceivedSpan, depth: int, note: str = "") -> None:
        if id(span) in seen:  # a cycle of parents (a broken exporter): each span once
            return
        seen.add(id(span))
        lines.extend(_span_lines(span, depth, note))
        for child in sorted(children[span.span_id], key=lambda s: s.start_unix_nano):
            walk(child, depth + 1)

    for root in sorted(roots, key=lambda s: s.start_unix_nano):
        walk(root, 1, f"parent {root.parent_span_id} not received" if root.parent_span_id else "")
    for span in spans:  # only in a cycle
        walk(span, 1, f"parent {span.parent_span_id} in a cycle")
    return "\n".join(lines)


def span_json(span: ReceivedSpan) -> str:
    """One span as a JSON object on one line (bytes in hex)."""
    fields = dataclasses.asdict(span)
    fields["events"] = [{"name": n, "time_unix_nano": t, "attributes": a} for n, t, a in span.events]
    fields["duration_ms"] = round(span.duration_ms, 3)
    return json.dumps(fields, ensure_ascii=False, default=_json_default)


class TraceViewer:
    """Prints what an `OtlpReceiver` gets: pass `viewer.arrived` as its `on_spans`."""

    def __init__(self, out: TextIO | None = None, as_json: bool = False, quiet_s: float = 2.0) -> None:
        self.out, self.as_json, self.quiet_s = out, as_json, quiet_s
        self._spans: dict[str, list[ReceivedSpan]] = collections.defaultdict(list)
        self._printed: dict[str, int] = {}  # spans of a trace printed so far
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def _print(self, text: str) -> None:
        print(text, file=self.out or sys.stdout, flush=True)

    def arrived(self, spans: list[ReceivedSpan]) -> None:
        if self.as_json:
            for span in spans:
                self._print(span_json(span))
            return
        loop = asyncio.get_running_loop()
        for span in spans:
            self._spans[span.trace_id].append(span)
        for trace_id in dict.fromkeys(s.trace_id for s in spans):
            if timer := self._timers.pop(trace_id, None):
                timer.cancel()
            self._timers[trace_id] = loop.call_later(self.quiet_s, self.show, trace_id)

    def show(self, trace_id: str) -> None:
        self._timers.pop(trace_id, None)
        spans = self._spans[trace_id]
        self._print(format_trace(spans, self._printed.get(trace_id, 0)) + "\n")
        self._printed[trace_id] = len(spans)

    def flush(self) -> None:
        """Print every trace still waiting for quiet (on exit)."""
        for trace_id, timer in list(self._timers.items()):
            timer.cancel()
            self.show(trace_id)


def parse_listen(listen: str) -> tuple[str, int]:
    """`host:port`, `[::1]:port` or `:port` (loopback)."""
    host, colon, port = listen.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{listen!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


async def serve(host: str, port: int, as_json: bool = False, quiet_s: float = 2.0) -> None:
    viewer = TraceViewer(as_json=as_json, quiet_s=quiet_s)
    async with OtlpReceiver(host, port, on_spans=viewer.arrived) as receiver:
        print(
            f"receiving OTLP/gRPC traces at {receiver.endpoint}: run the mesh with "
            f"OTEL_EXPORTER_OTLP_ENDPOINT={receiver.endpoint}; Ctrl-C stops",
            file=sys.stderr,
        )
        if host not in LOOPBACK:
            print(f"note: {host} is not loopback; anyone who reaches the port can send spans", file=sys.stderr)
        try:
            await asyncio.Event().wait()
        finally:
            viewer.flush()


def main(listen: str = "127.0.0.1:4317", as_json: bool = False, quiet_s: float = 2.0) -> int:
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        print(f"--listen: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(host, port, as_json, quiet_s))
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0
