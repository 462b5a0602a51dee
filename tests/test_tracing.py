"""One trace per chat (issue 30): a mesh with `tracing.endpoint` exports to a real OTLP/gRPC
receiver (the collector's own TraceService from opentelemetry-proto, served with grpcio:
capibara_grpc/telemetry/receiver.py), and a chat sent with a W3C `traceparent` arrives there as
one trace, from Envoy down to the model call, with the GenAI attributes.

The models are fake OpenAI-compatible servers (tests/support/fake_upstreams.py) so that the usage
and the stream's timing are known; the router is the real one.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import time

import openai
import pytest

from capibara_grpc.telemetry.trace_tree import format_trace
from tests.support.fake_upstreams import FakeUpstream, serving
from tests.support.mesh import running_mesh
from tests.support.otlp import otlp_receiver

BASE = 8400
TOKEN_DELAY_S = 0.05
MESH_SERVICES = ("capibara-envoy", "capibara-gateway", "capibara-router", "capibara-context", "capibara-inference")


@pytest.fixture(scope="module")
def receiver():
    with otlp_receiver() as running:
        yield running


@pytest.fixture(scope="module")
def upstreams():
    servers = {
        "one": FakeUpstream(flavor="openai", models=["model-one"]),
        "two": FakeUpstream(flavor="vllm", models=["org/model-two"], token_delay_s=TOKEN_DELAY_S),
        "three": FakeUpstream(flavor="ollama", models=["model-three"]),
    }
    with serving(servers):
        yield servers


def _model(fake: FakeUpstream, name: str, **extra) -> dict:
    return {"backend": {"url": fake.base_url, "protocol": "openai", "model_name": name}, **extra}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, upstreams, receiver):
    models = {
        "gpt-oss-20b": _model(upstreams["one"], "model-one", fallbacks=["phi"]),
        "phi": _model(upstreams["two"], "org/model-two", defaults={"max_tokens": 30}),
        "mixtral": _model(upstreams["three"], "model-three"),
    }
    # Batches leave every 200 ms (the default is 5 s), so a test waits less for its spans.
    tracing = {"endpoint": receiver.endpoint, "schedule_delay_ms": 200}
    with running_mesh(tmp_path_factory.mktemp("tracing"), BASE, models, tracing=tracing) as running:
        yield running


def _client(mesh) -> openai.OpenAI:
    http_client = openai.DefaultHttpxClient(verify=mesh.ssl_context())
    return openai.OpenAI(base_url=mesh.base_url + "/v1", api_key="unused", http_client=http_client, max_retries=0)


def _traceparent() -> tuple[str, str, str]:
    """(header, trace id, parent span id): the caller's own span, sampled."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def _traced_chat(mesh, model: str, content: str, max_tokens: int, **options):
    """(the answer, its trace id, the caller's span id) of one /v1 chat sent with a traceparent."""
    header, trace_id, caller_span = _traceparent()
    answer = _client(mesh).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        extra_headers={"traceparent": header},
        **options,
    )
    return answer, trace_id, caller_span


def _model_calls(spans):
    return [s for s in spans if "gen_ai.operation.name" in s.attributes]


def _complete_trace(receiver, trace_id: str, model_calls: int = 1):
    """The trace once its model call(s), Envoy's span and the gateway's span have all arrived."""

    def complete(_):
        spans = receiver.trace(trace_id)
        services = {s.service for s in spans}
        done = len(_model_calls(spans)) >= model_calls and {"capibara-envoy", "capibara-gateway"} <= services
        return spans if done else None

    try:
        return receiver.wait_for(complete, 30)
    except TimeoutError:
        print(format_trace(receiver.trace(trace_id)))  # shown by pytest with the failure
        raise


def test_a_chat_with_a_traceparent_is_one_trace_from_envoy_to_the_model_call(mesh, receiver):
    answer, trace_id, caller_span = _traced_chat(
        mesh, "auto", "Write a Python function that reverses a linked list.", 12
    )
    spans = _complete_trace(receiver, trace_id)
    by_id = {s.span_id: s for s in spans}
    services = {s.service for s in spans}
    assert set(MESH_SERVICES) <= services, sorted(services)

    # One trace, rooted at the caller: Envoy's first span is the caller's child, every other
    # span's parent is in the trace.
    roots = [s for s in spans if s.parent_span_id not in by_id]
    assert [(s.service, s.parent_span_id) for s in roots] == [("capibara-envoy", caller_span)], roots
    for service in MESH_SERVICES[1:]:
        assert any(s.service == service and s.kind == "SERVER" for s in spans), service

    # The gateway's Chat span is under Envoy's, and the model call under the inference service's
    # Generate, which is under the gateway.
    def ancestors(span):
        chain = []
        while span.parent_span_id in by_id:
            span = by_id[span.parent_span_id]
            chain.append((span.service, span.name))
        return chain

    (model_call,) = _model_calls(spans)
    chain = ancestors(model_call)
    assert chain[0][0] == "capibara-inference" and chain[0][1].endswith("InferenceService/Generate"), chain
    assert ("capibara-gateway", "capibara.gateway.v1.OpenAIService/ChatCompletions") in chain, chain
    assert chain[-1][0] == "capibara-envoy", chain

    # GenAI conventions on the model call, with the usage the client was told.
    attributes = model_call.attributes
    model_id = attributes["capibara.model_id"]
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == mesh.config["models"][model_id]["backend"]["model_name"]
    assert attributes["gen_ai.response.model"] == attributes["gen_ai.request.model"]  # what the server said
    assert model_id == answer.model
    assert attributes["gen_ai.request.max_tokens"] == 12
    assert attributes["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens
    assert attributes["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens
    assert attributes["gen_ai.response.finish_reasons"] == [answer.choices[0].finish_reason]
    assert attributes["gen_ai.system"] in ("openai", "vllm", "ollama")
    assert model_call.kind == "CLIENT" and model_call.event("gen_ai.first_token")

    # The mesh's own attributes: the route on the chat's span and the router's decision span.
    gateway = [s for s in spans if s.service == "capibara-gateway" and "capibara.route" in s.attributes]
    assert gateway and gateway[0].attributes["capibara.model_id"] == model_id
    assert any(s.service == "capibara-router" and s.name == "route decision" for s in spans)
    # No message text unless capture_content is on.
    texts = [v for s in spans for v in s.attributes.values() if isinstance(v, str)]
    assert not any("linked list" in text for text in texts)


def test_a_failover_shows_both_attempts(mesh, receiver, upstreams):
    """The router's model fails before its first token (503): the trace has the failed call and
    the fallback's, and the chat's span says what happened."""
    client = _client(mesh)
    prompt = "What is the capital of Australia?"
    first = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=5
    )
    routed = first.parse().model
    fake = {"gpt-oss-20b": "one", "phi": "two", "mixtral": "three"}[routed]
    upstreams[fake].fail_next(status=503)
    header, trace_id, _ = _traceparent()
    answer = client.chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=5,
        extra_headers={"traceparent": header},
    )
    assert answer.model != routed
    spans = _complete_trace(receiver, trace_id, model_calls=2)
    calls = sorted(_model_calls(spans), key=lambda s: s.start_unix_nano)
    assert [c.attributes["capibara.model_id"] for c in calls] == [routed, answer.model]
    assert calls[0].status_code == "ERROR" and calls[1].status_code != "ERROR"
    generates = [s for s in spans if s.name.endswith("InferenceService/Generate") and s.kind == "SERVER"]
    assert len(generates) == 2 and sorted(s.attributes["rpc.grpc.status_code"] for s in generates) == [0, 14]
    chat = [s for s in spans if s.attributes.get("capibara.fallback") is True]
    assert chat and chat[0].attributes["capibara.failed_models"] == [routed]


def test_a_streamed_chat_span_ends_after_its_last_token(mesh, receiver):
    """phi's server writes a token every 50 ms: the inference span lasts the whole stream, its
    first token is an event, and it ends after the client has read the last token."""
    stream, trace_id, _ = _traced_chat(mesh, "phi", "Count to ten.", 10, stream=True)
    arrivals = [time.time_ns() for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert len(arrivals) >= 3
    spans = _complete_trace(receiver, trace_id)
    (generate,) = [s for s in spans if s.name.endswith("InferenceService/Generate") and s.kind == "SERVER"]
    (model_call,) = _model_calls(spans)
    first_token = generate.event("gen_ai.first_token")
    assert first_token is not None
    streamed_ns = arrivals[-1] - arrivals[0]
    # The span covers the stream: from its first token to its end at least as long as the client
    # saw tokens arrive, and its end is not before the first token reached the client.
    assert generate.end_unix_nano - first_token[1] >= streamed_ns * 0.9
    assert generate.end_unix_nano >= arrivals[0]
    assert model_call.end_unix_nano - model_call.start_unix_nano >= (len(arrivals) - 1) * TOKEN_DELAY_S * 1e9 * 0.9


def test_a_consensus_chat_is_one_trace_with_a_model_call_per_model(mesh, receiver):
    answer, trace_id, _ = _traced_chat(mesh, "consensus", "Is the sky blue?", 6)
    assert answer.choices[0].message.content
    spans = _complete_trace(receiver, trace_id, model_calls=3)
    (decide,) = [s for s in spans if s.service == "capibara-consensus" and s.kind == "SERVER"]
    assert decide.attributes["capibara.consensus.strategy"] == "vote"
    calls = _model_calls(spans)
    assert sorted(c.attributes["capibara.model_id"] for c in calls) == ["gpt-oss-20b", "mixtral", "phi"]
    by_id = {s.span_id: s for s in spans}
    for call in calls:  # model call <- inference's Generate <- consensus' Decide
        generate = by_id[call.parent_span_id]
        assert generate.name.endswith("InferenceService/Generate") and generate.parent_span_id == decide.span_id
    chat = [s for s in spans if s.service == "capibara-gateway" and s.kind == "SERVER"]
    assert chat[0].attributes["capibara.consensus.strategy"] == "vote" and decide.parent_span_id == chat[0].span_id


def test_the_services_logs_carry_the_trace_id(mesh, receiver):
    _, trace_id, _ = _traced_chat(mesh, "mixtral", "Hello", 4)
    _complete_trace(receiver, trace_id)
    logs = pathlib.Path(mesh.config["state_dir"]) / "logs"
    lines = [line for path in logs.glob("*.log") for line in path.read_text(errors="replace").splitlines()]
    traced = [line for line in lines if f'"trace_id": "{trace_id}"' in line]
    assert any("ChatCompletions" in line for line in traced), f"no log line with trace_id {trace_id}"


def test_without_an_endpoint_nothing_is_exported(tmp_path, upstreams):
    """No tracing.endpoint and no OTEL_* variable: a chat with a traceparent exports nothing, even
    to a receiver on OTLP's default port, and Envoy's config has no tracer."""
    assert not any(k.startswith("OTEL_EXPORTER_OTLP") for k in os.environ)
    with contextlib.ExitStack() as stack:
        try:
            default_port = stack.enter_context(otlp_receiver(4317))
        except OSError:
            pytest.skip("port 4317 is taken on this machine")
        models = {"gpt-oss-20b": _model(upstreams["one"], "model-one")}
        with running_mesh(tmp_path, BASE + 200, models, router=False) as untraced:
            answer, _, _ = _traced_chat(untraced, "gpt-oss-20b", "Hello", 4)
            assert answer.choices[0].message.content
            envoy_yaml = (tmp_path / "state" / "envoy" / "envoy.yaml").read_text()
            logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "state" / "logs").glob("*.log"))
            time.sleep(1.0)  # longer than a batch would wait, were spans made
        assert "opentelemetry" not in envoy_yaml and "trace_id" not in logs
        assert default_port.spans == []


def test_split_processes_join_one_trace_over_grpc(tmp_path, upstreams, receiver):
    """`capibara up --split`: each service in its own process, calling the others over gRPC
    through Envoy's mesh listener. The gateway's calls are CLIENT spans whose traceparent makes
    them the parents of the other processes' SERVER spans; each process has its own resource."""
    models = {"gpt-oss-20b": _model(upstreams["one"], "model-one")}
    tracing = {"endpoint": receiver.endpoint, "schedule_delay_ms": 200}
    with running_mesh(tmp_path, BASE + 400, models, router=False, split=True, tracing=tracing) as split:
        _, trace_id, _ = _traced_chat(split, "gpt-oss-20b", "Hello", 4)
        _complete_trace(receiver, trace_id)

        def every_process_sent(_):
            # Each process exports on its own schedule: Envoy's two listeners and every service.
            sent = [s.service for s in receiver.trace(trace_id)]
            services = {"capibara-gateway", "capibara-context", "capibara-inference"}
            return sent.count("capibara-envoy") >= 2 and services <= set(sent)

        receiver.wait_for(every_process_sent, 10)
        spans = receiver.trace(trace_id)
    by_id = {s.span_id: s for s in spans}
    (generate,) = [s for s in spans if s.service == "capibara-inference" and s.kind == "SERVER"]
    # inference's SERVER span <- Envoy's mesh listener <- the gateway's CLIENT span for Generate
    envoy_hop = by_id[generate.parent_span_id]
    assert envoy_hop.service == "capibara-envoy"
    client = by_id[envoy_hop.parent_span_id]
    assert (client.service, client.kind, client.name) == (
        "capibara-gateway",
        "CLIENT",
        "capibara.inference.v1.InferenceService/Generate",
    )
    pids = {s.service: s.resource["process.pid"] for s in spans if "process.pid" in s.resource}
    assert pids["capibara-gateway"] != pids["capibara-inference"] != pids["capibara-context"]
    assert len(_model_calls(spans)) == 1
