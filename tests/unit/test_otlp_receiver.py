"""The OTLP/gRPC receiver the trace tests and `capibara traces` use: spans exported to it by the
OpenTelemetry SDK's own OTLP exporter, over a real socket, arrive whole (ids, parents, services,
attributes, events, status); waiting for spans fails with what did arrive; the tree printer
nests children under parents and notes a parent that never came."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from capibara_grpc.cli import main as cli_main
from capibara_grpc.telemetry.receiver import OtlpReceiver, ReceivedSpan
from capibara_grpc.telemetry.trace_tree import TraceViewer, format_trace, parse_listen, span_json


def _provider(endpoint: str, service: str) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service, "service.version": "0.1.0"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=5)))
    return provider


def _export_a_chat(endpoint: str) -> tuple[str, str]:
    """A gateway span with an inference child from another service; (trace id, gateway span id).
    Run in a thread: the SDK's exporter blocks while the receiver answers on the event loop."""
    gateway, inference = _provider(endpoint, "gateway"), _provider(endpoint, "inference")
    try:
        with gateway.get_tracer("capibara.gateway").start_as_current_span("Chat", kind=SpanKind.SERVER) as root:
            root.set_attribute("rpc.grpc.status_code", 0)
            tracer = inference.get_tracer("capibara.inference")
            with tracer.start_as_current_span("chat phi", kind=SpanKind.CLIENT) as call:
                call.set_attributes(
                    {
                        "gen_ai.request.model": "phi",
                        "gen_ai.request.temperature": 0.5,
                        "gen_ai.usage.output_tokens": 7,
                        "gen_ai.response.finish_reasons": ["stop"],
                        "capibara.cache.hit": False,
                    }
                )
                call.add_event("first_token", {"capibara.tokens": 1})
                call.set_status(Status(StatusCode.ERROR, "model server 503"))
        context = root.get_span_context()
        return format(context.trace_id, "032x"), format(context.span_id, "016x")
    finally:
        gateway.shutdown()
        inference.shutdown()


async def test_spans_from_the_sdk_exporter_arrive_whole():
    async with OtlpReceiver() as receiver:
        assert receiver.port > 0 and receiver.endpoint == f"http://127.0.0.1:{receiver.port}"
        trace_id, root_id = await asyncio.to_thread(_export_a_chat, receiver.endpoint)
        spans = await receiver.wait_for(lambda spans: len(spans) >= 2 and spans, 10)

    assert receiver.requests == 2  # SimpleSpanProcessor: one Export per span
    assert receiver.trace(trace_id.upper()) == spans == receiver.traces()[trace_id]
    call, root = sorted(spans, key=lambda s: s.service, reverse=True)
    assert (root.service, root.name, root.kind, root.span_id, root.parent_span_id) == (
        "gateway",
        "Chat",
        "SERVER",
        root_id,
        "",
    )
    assert root.resource["service.version"] == "0.1.0" and root.scope == "capibara.gateway"
    assert root.attributes == {"rpc.grpc.status_code": 0} and root.status_code == "UNSET"
    assert (call.service, call.kind, call.parent_span_id, call.trace_id) == ("inference", "CLIENT", root_id, trace_id)
    assert call.attributes == {
        "gen_ai.request.model": "phi",
        "gen_ai.request.temperature": 0.5,
        "gen_ai.usage.output_tokens": 7,
        "gen_ai.response.finish_reasons": ["stop"],
        "capibara.cache.hit": False,
    }
    name, at, attributes = call.event("first_token")
    assert call.start_unix_nano <= at <= call.end_unix_nano and attributes == {"capibara.tokens": 1}
    assert (call.status_code, call.status_message) == ("ERROR", "model server 503")
    assert root.start_unix_nano <= call.start_unix_nano <= call.end_unix_nano <= root.end_unix_nano
    assert json.loads(span_json(call))["events"][0]["name"] == "first_token"


async def test_waiting_times_out_naming_what_arrived():
    receiver = await OtlpReceiver.start()
    try:
        with pytest.raises(TimeoutError, match="no spans arrived"):
            await receiver.wait_for(lambda spans: spans, 0.05)
        await asyncio.to_thread(_export_a_chat, receiver.endpoint)
        with pytest.raises(TimeoutError, match=r"2 spans arrived in 2 requests: gateway: Chat; inference: chat phi"):
            await receiver.wait_for(lambda spans: [s for s in spans if s.service == "router"], 0.2)
    finally:
        await receiver.stop()


async def test_a_second_receiver_cannot_take_a_bound_port():
    async with OtlpReceiver() as first:
        with pytest.raises(OSError, match=f"127.0.0.1:{first.port}"):
            await OtlpReceiver.start(port=first.port)


def _span(span_id: str, parent: str, service: str, name: str, start_ms: float, end_ms: float, **attributes):
    return ReceivedSpan(
        trace_id="ab" * 16,
        span_id=span_id,
        parent_span_id=parent,
        name=name,
        kind="INTERNAL",
        service=service,
        resource={"service.name": service},
        attributes=attributes,
        events=[],
        status_code="UNSET",
        status_message="",
        start_unix_nano=int(start_ms * 1e6),
        end_unix_nano=int(end_ms * 1e6),
        scope="test",
    )


def test_the_tree_nests_children_by_start_time_and_notes_a_missing_parent():
    spans = [
        _span("02", "01", "inference", "chat phi", 20, 90, **{"gen_ai.usage.output_tokens": 7, "http.url": "x"}),
        _span("01", "", "gateway", "Chat", 0, 100, **{"rpc.grpc.status_code": 0}),
        _span("03", "01", "router", "Route", 5, 15),
        _span("05", "ff", "context", "Prepare", 30, 32.5),
    ]
    assert format_trace(spans).splitlines() == [
        f"trace {'ab' * 16}  4 spans, 100.0 ms",
        "  gateway  Chat  100.0 ms  rpc.grpc.status_code=0",
        "    router  Route  10.0 ms",
        "    inference  chat phi  70.0 ms  gen_ai.usage.output_tokens=7",
        "  context  Prepare  2.5 ms  (parent ff not received)",
    ]


def test_an_error_long_attributes_and_events_go_on_their_own_lines():
    span = _span("01", "", "inference", "chat phi", 0, 50, **{f"gen_ai.k{i}": "v" * 20 for i in range(5)})
    span = dataclasses.replace(span, status_code="ERROR", status_message="503", events=[("ft", int(12e6), {})])
    lines = format_trace([span]).splitlines()
    assert lines[1] == "  inference  chat phi  50.0 ms  ERROR: 503"
    assert lines[2].startswith("      gen_ai.k0=" + "v" * 20 + "  gen_ai.k1=")
    assert lines[-1] == "      · ft +12.0 ms"


async def test_the_viewer_prints_a_trace_once_it_is_quiet_and_again_when_more_comes():
    out = io.StringIO()
    viewer = TraceViewer(out, quiet_s=0.05)
    viewer.arrived([_span("01", "", "gateway", "Chat", 0, 100)])
    viewer.arrived([_span("02", "01", "inference", "chat phi", 20, 90)])
    await asyncio.sleep(0.2)
    assert out.getvalue().count("trace ") == 1 and "    inference  chat phi" in out.getvalue()
    viewer.arrived([_span("03", "01", "router", "Route", 5, 15)])
    viewer.flush()
    assert "3 spans, again: 1 more" in out.getvalue()


def test_listen_addresses_and_a_bad_one():
    assert parse_listen("127.0.0.1:4317") == ("127.0.0.1", 4317)
    assert parse_listen("[::1]:0") == ("::1", 0) and parse_listen(":4318") == ("127.0.0.1", 4318)
    assert cli_main(["traces", "--listen", "nowhere"]) == 2
