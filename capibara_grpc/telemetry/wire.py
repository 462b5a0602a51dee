"""Spans in OTLP's protobuf wire format, written by hand: an ExportTraceServiceRequest as bytes.

Why not the generated messages: building one opentelemetry-proto Span message per span and
serializing it cost ~16 us a span, the largest part of what tracing costs the mesh (a chat makes
four or five; benchmarks/tracing_cost.py). Most of a span repeats from chat to chat (its name,
`rpc.*` attributes, model names): written once, its bytes are reused. The layout follows
opentelemetry/proto/trace/v1/trace.proto and common/v1/common.proto (field numbers below);
tests/unit/test_telemetry_wire.py parses the output with the generated messages and compares.
"""

from __future__ import annotations

import struct

_FIXED64 = struct.Struct("<Q").pack
_DOUBLE = struct.Struct("<d").pack
# Bytes of (key, value) attributes and of names, kept once written; bounded, since values such as
# a model's name are few but not known in advance.
_CACHE_LIMIT = 4096
_attribute_cache: dict[tuple, bytes] = {}
_name_cache: dict[str, bytes] = {}


_SMALL = [bytes((n,)) for n in range(0x80)]


def varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return _SMALL[value]
    if value < 0:
        value &= 0xFFFFFFFFFFFFFFFF  # int64 on the wire: two's complement, 10 bytes
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (a string, bytes or a message)."""
    if number < 16 and len(payload) < 0x80:  # one byte of tag, one of length: most fields
        return bytes((number << 3 | 2, len(payload))) + payload
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def any_value(value) -> bytes:
    """common.v1.AnyValue: string 1, bool 2, int 3, double 4, array 5 (ArrayValue.values 1)."""
    if isinstance(value, str):
        return field(1, value.encode())
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + varint(value)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, (list, tuple)):
        return field(5, b"".join(field(1, any_value(item)) for item in value))
    return field(1, str(value).encode())


def key_value(key: str, value) -> bytes:
    """common.v1.KeyValue (key 1, value 2), unframed."""
    return field(1, key.encode()) + field(2, any_value(value))


def attribute(number: int, key: str, value) -> bytes:
    """A KeyValue as field `number` of its message; a value seen before is not written again
    (type in the key: True and 1 are different attributes)."""
    if isinstance(value, (str, bool, int, float)) or (
        isinstance(value, list) and len(value) == 1 and isinstance(value[0], str)
    ):
        cache_key = (number, key, type(value), value if not isinstance(value, list) else tuple(value))
        cached = _attribute_cache.get(cache_key)
        if cached is None:
            cached = field(number, key_value(key, value))
            if len(_attribute_cache) < _CACHE_LIMIT:
                _attribute_cache[cache_key] = cached
        return cached
    return field(number, key_value(key, value))


def _name(name: str) -> bytes:
    cached = _name_cache.get(name)
    if cached is None:
        cached = field(5, name.encode())
        if len(_name_cache) < _CACHE_LIMIT:
            _name_cache[name] = cached
    return cached


def span(s) -> bytes:
    """trace.v1.Span, unframed: trace_id 1, span_id 2, parent_span_id 4, name 5, kind 6,
    start 7 and end 8 (fixed64), attributes 9, events 11, status 15, flags 16 (fixed32)."""
    parts = [b"\x0a\x10", s.trace_id.to_bytes(16, "big"), b"\x12\x08", s.span_id.to_bytes(8, "big")]
    if s.parent_id:
        parts += (b"\x22\x08", s.parent_id.to_bytes(8, "big"))
    parts += (_name(s.name), b"\x30", varint(s.kind), b"\x39", _FIXED64(s.start_ns), b"\x41", _FIXED64(s.end_ns))
    parts += [attribute(9, key, value) for key, value in s.attributes.items()]
    for name, at, attributes in s.events:  # Event: time 1 (fixed64), name 2, attributes 3
        event = b"\x09" + _FIXED64(at) + field(2, name.encode())
        event += b"".join(attribute(3, key, value) for key, value in attributes.items())
        parts.append(field(11, event))
    if s.status:  # Status: message 2, code 3
        parts.append(
            field(15, (field(2, s.status_message.encode()) if s.status_message else b"") + b"\x18" + varint(s.status))
        )
    parts.append(b"\x85\x01\x01\x00\x00\x00")  # flags: the W3C trace flags, sampled
    return b"".join(parts)


def resource_spans_head(resource_attributes: dict, scope_name: str, scope_version: str) -> tuple[bytes, bytes]:
    """(ResourceSpans.resource (field 1), ScopeSpans.scope (field 1)), framed, for one service."""
    resource = b"".join(field(1, key_value(k, v)) for k, v in resource_attributes.items())
    scope = field(1, scope_name.encode()) + (field(2, scope_version.encode()) if scope_version else b"")
    return field(1, resource), field(1, scope)


def export_request(groups: list[tuple[tuple[bytes, bytes], list[bytes]]]) -> bytes:
    """ExportTraceServiceRequest (resource_spans 1) of (resource head, encoded spans) groups:
    ResourceSpans (resource 1, scope_spans 2), ScopeSpans (scope 1, spans 2)."""
    out = []
    for (resource, scope), spans in groups:
        scope_spans = scope + b"".join(field(2, encoded) for encoded in spans)
        out.append(field(1, resource + field(2, scope_spans)))
    return b"".join(out)
