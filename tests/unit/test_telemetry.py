"""The tracing core without a mesh: settings from the file and OTEL_* variables, W3C trace
context, the samplers, and spans exported over OTLP/gRPC to the real receiver on loopback."""

from __future__ import annotations

import asyncio
import json
import types

import pytest

from capibara_grpc.chat.types import Finished, Message, SamplingParams, Token
from capibara_grpc.config.schema import TracingConfig
from capibara_grpc.telemetry import genai, install, spans
from capibara_grpc.telemetry.receiver import OtlpReceiver
from capibara_grpc.telemetry.settings import TracingSettingsError, resolve

pytestmark = pytest.mark.unit
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_tracing_is_off_without_an_endpoint_and_the_variables_win_over_the_file():
    assert not resolve(TracingConfig(), {}).enabled
    assert not resolve(TracingConfig(endpoint="http://collector:4317"), {"OTEL_SDK_DISABLED": "true"}).enabled
    settings = resolve(
        TracingConfig(endpoint="http://file:4317", sampler="always_on", service_name_prefix="file"),
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector.example:4317",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
            "OTEL_SERVICE_NAME": "shop",
            "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=abc%3D,team=t1",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=staging",
            "OTEL_BSP_SCHEDULE_DELAY": "250",
        },
    )
    assert (settings.target, settings.tls) == ("collector.example:4317", True)
    assert (settings.sampler, settings.ratio, settings.root_ratio) == ("parentbased_traceidratio", 0.25, 0.25)
    assert settings.service_name("gateway") == "shop-gateway"
    assert settings.headers == (("x-api-key", "abc="), ("team", "t1"))
    assert settings.resource_attributes == (("deployment.environment", "staging"),)
    assert settings.schedule_delay_ms == 250
    traces = resolve(TracingConfig(endpoint="collector:4317"), {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1"})
    assert traces.target == "t:1" and not traces.tls


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER 'jaeger_remote' must be one of"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "OTLP/gRPC only"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/v1/traces"}, "has a path"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"}, "from 0 to 1"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "sk-secret-value"}, "must be key=value"),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "-1"}, "whole number"),
    ],
)
def test_a_wrong_setting_is_named_and_a_header_value_never_echoed(environ, message):
    with pytest.raises(TracingSettingsError, match=message) as raised:
        resolve(TracingConfig(endpoint="http://collector:4317"), environ)
    assert "sk-secret-value" not in str(raised.value)


def test_traceparent_is_read_as_the_w3c_spec_says():
    parent = spans.parse_traceparent(f"00-{TRACE}-00f067aa0ba902b7-01")
    assert parent == (int(TRACE, 16), 0x00F067AA0BA902B7, True)
    assert spans.parse_traceparent(f"00-{TRACE}-00f067aa0ba902b7-00").sampled is False
    assert spans.parse_traceparent(f"01-{TRACE}-00f067aa0ba902b7-01-future") is not None  # a later version
    for bad in (
        "",
        f"00-{TRACE}-00f067aa0ba902b7-01-extra",  # version 00 has exactly four parts
        f"ff-{TRACE}-00f067aa0ba902b7-01",
        f"00-{'0' * 32}-00f067aa0ba902b7-01",
        f"00-{TRACE}-{'0' * 16}-01",
        f"00-{TRACE.upper()}-00f067aa0ba902b7-01",
        "00-xyz",
    ):
        assert spans.parse_traceparent(bad) is None, bad


def test_the_samplers_follow_the_parent_or_the_trace_ids_ratio():
    def tracer(sampler, ratio=1.0):
        return spans.Tracer(
            resolve(TracingConfig(endpoint="http://c:1", sampler=sampler, sampler_arg=ratio), {}), None, "x"
        )

    sampled, unsampled = spans.RemoteParent(7, 8, True), spans.RemoteParent(7, 8, False)
    assert tracer("parentbased_always_off").start("a", spans.SERVER, sampled).recording
    assert not tracer("parentbased_always_on").start("a", spans.SERVER, unsampled).recording
    assert not tracer("parentbased_always_off").start("a", spans.SERVER, None).recording
    assert tracer("always_on").start("a", spans.SERVER, unsampled).recording
    ratio = tracer("parentbased_traceidratio", 0.1)
    kept = sum(ratio.start("a", spans.SERVER, None).recording for _ in range(20000))
    assert 1500 < kept < 2500
    child = ratio.start("b", spans.CLIENT, ratio.start("a", spans.SERVER, sampled))
    assert (child.trace_id, child.recording) == (7, True)
    assert child.traceparent.endswith("-01") and child.traceparent.startswith("00-" + "7".rjust(32, "0"))


async def test_finished_spans_reach_the_collector_in_batches_and_a_dead_one_costs_nothing_but_them():
    async with OtlpReceiver() as receiver:
        config = TracingConfig(endpoint=receiver.endpoint, schedule_delay_ms=50, max_export_batch_size=3)
        uninstall = await install(resolve(config, {}), "gateway")
        try:
            root = spans.TRACER.start("chat", spans.SERVER, spans.parse_traceparent(f"00-{TRACE}-00f067aa0ba902b7-01"))
            token = spans.current.set(root)
            with spans.span("cache lookup", attributes={"capibara.cache.hit": False}):
                pass
            for _ in range(3):
                spans.TRACER.start("call", spans.CLIENT, root).end()
            spans.current.reset(token)
            root.end()
            received = await receiver.wait_for(lambda got: got if len(got) == 5 else None, 5)
        finally:
            await uninstall()
        assert spans.TRACER is None
    assert {s.trace_id for s in received} == {TRACE}
    by_name = {s.name: s for s in received}
    assert by_name["chat"].parent_span_id == "00f067aa0ba902b7" and by_name["chat"].service == "capibara-gateway"
    assert by_name["cache lookup"].parent_span_id == by_name["chat"].span_id
    assert receiver.requests >= 2  # a batch of 3 left at once, the rest on the timer

    # A collector that is gone: the export fails, is logged once, and the mesh goes on.
    uninstall = await install(resolve(TracingConfig(endpoint="http://127.0.0.1:9", export_timeout_ms=200), {}), "x")
    try:
        for _ in range(5):
            spans.TRACER.start("lost", spans.SERVER, None).end()
        await spans.TRACER.exporter.flush()
        assert spans.TRACER.exporter.pending == []
    finally:
        await asyncio.wait_for(uninstall(), 5)


async def test_the_model_calls_span_carries_the_chat_only_when_capture_content_is_on():
    model = types.SimpleNamespace(chat_template="server", server_kind="vllm", model_id="phi")
    messages = [Message("user", "¿Qué es un capibara?")]

    async def answer():
        yield Token("Un roedor", 0)
        yield Token(" grande.", 1)
        yield Finished("stop", prompt_tokens=9, completion_tokens=2, backend_model="phi-3")

    async with OtlpReceiver() as receiver:
        for capture in (True, False):
            config = TracingConfig(endpoint=receiver.endpoint, schedule_delay_ms=50, capture_content=capture)
            uninstall = await install(resolve(config, {}), "inference")
            try:
                root = spans.TRACER.start("generate", spans.SERVER, None)
                token = spans.current.set(root)
                items = genai.traced(model, "phi-3", ("127.0.0.1", 8000), messages, SamplingParams(), answer())
                assert [type(item) async for item in items] == [Token, Token, Finished]
                spans.current.reset(token)
                root.end()
            finally:
                await uninstall()
        received = await receiver.wait_for(lambda got: got if len(got) == 4 else None, 5)
    captured, plain = (s.attributes for s in received if s.name == "chat phi-3")
    assert json.loads(captured["gen_ai.input.messages"]) == [{"role": "user", "content": "¿Qué es un capibara?"}]
    assert json.loads(captured["gen_ai.output.messages"]) == [
        {"role": "assistant", "content": "Un roedor grande.", "finish_reason": "stop"}
    ]
    assert captured["gen_ai.usage.output_tokens"] == 2 and captured["gen_ai.response.model"] == "phi-3"
    assert "gen_ai.input.messages" not in plain and "gen_ai.output.messages" not in plain
    assert plain["gen_ai.response.finish_reasons"] == ["stop"]
