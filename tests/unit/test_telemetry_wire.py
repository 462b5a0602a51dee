"""The hand-written OTLP encoding (capibara_grpc/telemetry/wire.py) parsed back with the
collector's own generated messages (opentelemetry-proto): every field a span carries comes out as
it went in."""

from __future__ import annotations

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1 import trace_pb2

from capibara_grpc.config.schema import TracingConfig
from capibara_grpc.telemetry import spans, wire
from capibara_grpc.telemetry.export import SpanExporter
from capibara_grpc.telemetry.settings import resolve

pytestmark = pytest.mark.unit


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind)


def _attributes(key_values) -> dict:
    return {kv.key: _value(kv.value) for kv in key_values}


def _span(name: str, parent: int, service: str, **attributes) -> spans.Span:
    span = spans.Span(0x0AF7651916CD43DD8448EB211C80319C, parent, name, spans.SERVER, service, True)
    span.attributes.update(attributes)
    span.end_ns = span.start_ns + 1234567
    return span


def test_spans_parse_back_with_the_collectors_own_messages():
    exporter = SpanExporter(resolve(TracingConfig(endpoint="http://127.0.0.1:4317", resource_attributes={"env": "t"})))
    chat = _span(
        "capibara.gateway.v1.ChatService/Chat",
        0xB7AD6B7169203331,
        "gateway",
        **{"capibara.route": "math", "capibara.fallback": True, "n": -3, "big": 2**40, "p": 0.25, "models": ["a", "b"]},
    )
    chat.event("gen_ai.first_token", {"index": 0})
    chat.fail("UNAVAILABLE: model 'phi' is down")
    root = _span(
        "chat phi", 0, "inference", **{"gen_ai.usage.input_tokens": 20, "gen_ai.response.finish_reasons": ["stop"]}
    )
    root.kind = spans.CLIENT
    request = ExportTraceServiceRequest.FromString(
        exporter.encode([(s.service, wire.span(s)) for s in (chat, root, chat)])
    )

    by_service = {}
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        (scope_spans,) = resource_spans.scope_spans
        assert scope_spans.scope.name == "capibara_grpc"
        by_service[resource["service.name"]] = (resource, list(scope_spans.spans))
    assert set(by_service) == {"capibara-gateway", "capibara-inference"}
    resource, (first, again) = by_service["capibara-gateway"]
    assert resource["env"] == "t" and resource["service.namespace"] == "capibara" and resource["process.pid"] > 0
    assert first == again  # the cached bytes of repeated attributes are the same span again
    assert first.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"
    assert first.span_id == chat.span_id.to_bytes(8, "big") and first.parent_span_id.hex() == "b7ad6b7169203331"
    assert first.name == "capibara.gateway.v1.ChatService/Chat" and first.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert (first.start_time_unix_nano, first.end_time_unix_nano) == (chat.start_ns, chat.end_ns)
    assert _attributes(first.attributes) == {
        "capibara.route": "math",
        "capibara.fallback": True,
        "n": -3,
        "big": 2**40,
        "p": 0.25,
        "models": ["a", "b"],
    }
    (event,) = first.events
    assert (event.name, event.time_unix_nano, _attributes(event.attributes)) == (
        "gen_ai.first_token",
        chat.events[0][1],
        {"index": 0},
    )
    assert first.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert first.status.message == "UNAVAILABLE: model 'phi' is down"
    assert first.flags & 0xFF == 1  # sampled

    _, (model_call,) = by_service["capibara-inference"]
    assert model_call.parent_span_id == b"" and model_call.kind == trace_pb2.Span.SPAN_KIND_CLIENT
    assert model_call.status.code == trace_pb2.Status.STATUS_CODE_UNSET
    assert _attributes(model_call.attributes) == {
        "gen_ai.usage.input_tokens": 20,
        "gen_ai.response.finish_reasons": ["stop"],
    }


def test_varints_match_protobufs():
    for value in (0, 1, 127, 128, 300, 2**32, 2**63 - 1, -1, -(2**63)):
        encoded = wire.field(9, wire.key_value("k", value))
        (kv,) = trace_pb2.Span.FromString(encoded).attributes
        assert kv.value.int_value == value
