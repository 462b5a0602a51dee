"""Usage and rate limits per API key, on a mesh of its own: every generating call over REST, native
gRPC and the OpenAI API (official SDK) is counted under its key's name or short id in the
gateway's metrics, the key itself appears nowhere, and a key over its own limit gets 429 /
RESOURCE_EXHAUSTED while the other keys go on."""

from __future__ import annotations

import pathlib
import urllib.request

import grpc
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from capibara_grpc.api_keys import short_id
from capibara_grpc.stubs import gateway_pb2, gateway_pb2_grpc
from tests.support.channels import edge_channel
from tests.support.mesh import launched_model, mesh_config, start_mesh, stop_mesh

MODEL = "phi"
# Named in the keys file: counted as "alice".
ALICE_KEY = "alice-key-0123456789abcdef"
# Without a name: counted under its short id, computed by the edge's Lua (key_id.lua).
UNNAMED_KEY = "unnamed-key-fedcba9876543210"
# Named, with its own tight chat limit (edge.key_rate_limit.chat_overrides).
TRIAL_KEY = "trial-key-00112233445566778899"
CAROL_KEY = "carol-key-99887766554433221100"
TRIAL_PER_MINUTE = 2
DEFAULT_PER_MINUTE = 40
ALL_KEYS = (ALICE_KEY, UNNAMED_KEY, TRIAL_KEY, CAROL_KEY)
HELLO = {"message": "Say hello.", "model": MODEL, "max_tokens": 4}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    directory = tmp_path_factory.mktemp("key_usage")
    keys = directory / "api-keys.txt"
    keys.write_text(
        f"# name: key\nalice: {ALICE_KEY}\n{UNNAMED_KEY}  # no name\ntrial:{TRIAL_KEY}\n  carol : {CAROL_KEY}\n"
    )
    config = mesh_config(directory / "state", 20000, {MODEL: launched_model(20080, max_tokens=4)}, router=False)
    config["edge"].update(
        api_keys_file=str(keys),
        key_rate_limit={"chat": DEFAULT_PER_MINUTE, "chat_overrides": {"trial": TRIAL_PER_MINUTE}},
    )
    running = start_mesh(directory, config)
    try:
        yield running
    finally:
        stop_mesh(running)


def openai_client(mesh, key: str) -> openai.OpenAI:
    http_client = openai.DefaultHttpxClient(verify=mesh.ssl_context())
    return openai.OpenAI(base_url=mesh.base_url + "/v1", api_key=key, http_client=http_client, max_retries=0)


def metrics_text(mesh) -> str:
    with urllib.request.urlopen(mesh.metrics_url("gateway"), timeout=10) as response:
        return response.read().decode()


def key_samples(mesh) -> dict[tuple, float]:
    """(metric, key, model, code or kind) -> value, of the per-key counters."""
    samples = {}
    for family in text_string_to_metric_families(metrics_text(mesh)):
        for sample in family.samples:
            if sample.name in ("capibara_key_requests_total", "capibara_key_tokens_total"):
                labels = sample.labels
                last = labels.get("code") or labels.get("kind")
                samples[(sample.name, labels["key"], labels["model"], last)] = sample.value
    return samples


class Tally:
    """What one key's client saw: calls by final code, and the tokens the answers reported."""

    def __init__(self):
        self.codes: dict[str, int] = {}
        self.prompt = self.completion = 0

    def answered(self, prompt: int, completion: int) -> None:
        self.codes["OK"] = self.codes.get("OK", 0) + 1
        self.prompt += prompt
        self.completion += completion


def rest_chat(mesh, key: str, tally: Tally, **headers) -> None:
    status, body, _ = mesh.request("POST", "/api/chat", HELLO, headers={"x-api-key": key, **headers})
    assert status == 200, body
    tally.answered(body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])


async def grpc_chat_stream(mesh, key: str, tally: Tally) -> None:
    async with edge_channel(mesh) as channel:
        call = gateway_pb2_grpc.ChatServiceStub(channel).Chat(
            gateway_pb2.ChatRequest(message="Say hello.", model=MODEL, max_tokens=4),
            timeout=60,
            metadata=(("authorization", f"Bearer {key}"),),
        )
        done = [r.done async for r in call if r.HasField("done")]
    tally.answered(done[0].usage.prompt_tokens, done[0].usage.completion_tokens)


async def grpc_complete(mesh, key: str, tally: Tally) -> None:
    async with edge_channel(mesh) as channel:
        answer = await gateway_pb2_grpc.ChatServiceStub(channel).Complete(
            gateway_pb2.CompleteRequest(message="Say hello.", model=MODEL, max_tokens=4),
            timeout=60,
            metadata=(("x-api-key", key),),
        )
    tally.answered(answer.usage.prompt_tokens, answer.usage.completion_tokens)


def openai_chat(mesh, key: str, tally: Tally, stream: bool = False) -> None:
    client = openai_client(mesh, key)
    messages = [{"role": "user", "content": "Say hello."}]
    if stream:
        chunks = list(
            client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=4, stream=True, stream_options={"include_usage": True}
            )
        )
        usage = chunks[-1].usage
    else:
        usage = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4).usage
    tally.answered(usage.prompt_tokens, usage.completion_tokens)


async def test_usage_is_counted_per_key_exactly(mesh):
    alice, unnamed = Tally(), Tally()
    rest_chat(mesh, ALICE_KEY, alice)
    # A client cannot pass as another key: the edge drops its own x-capibara-key-id.
    rest_chat(mesh, ALICE_KEY, alice, **{"x-capibara-key-id": "carol"})
    await grpc_chat_stream(mesh, ALICE_KEY, alice)
    openai_chat(mesh, ALICE_KEY, alice)
    openai_chat(mesh, ALICE_KEY, alice, stream=True)
    # An error is counted with its code, under no model (the name asked for is not a label).
    status, body, _ = mesh.request(
        "POST", "/api/chat", {**HELLO, "model": "no-such-model"}, headers={"x-api-key": ALICE_KEY}
    )
    assert status == 404, body
    rest_chat(mesh, UNNAMED_KEY, unnamed)
    await grpc_complete(mesh, UNNAMED_KEY, unnamed)
    openai_chat(mesh, UNNAMED_KEY, unnamed)

    samples = key_samples(mesh)
    unnamed_id = short_id(UNNAMED_KEY)
    assert samples[("capibara_key_requests_total", "alice", MODEL, "OK")] == 5
    assert samples[("capibara_key_requests_total", "alice", "-", "NOT_FOUND")] == 1
    assert samples[("capibara_key_tokens_total", "alice", MODEL, "prompt")] == alice.prompt
    assert samples[("capibara_key_tokens_total", "alice", MODEL, "completion")] == alice.completion
    assert samples[("capibara_key_requests_total", unnamed_id, MODEL, "OK")] == 3
    assert samples[("capibara_key_tokens_total", unnamed_id, MODEL, "prompt")] == unnamed.prompt
    assert samples[("capibara_key_tokens_total", unnamed_id, MODEL, "completion")] == unnamed.completion
    assert alice.completion > 0 and unnamed.prompt > 0
    assert {key for _, key, _, _ in samples} <= {"alice", unnamed_id, "trial", "carol"}


def key_calls(mesh, key: str) -> dict[tuple[str, str], float]:
    """(method, code) -> calls of every API by `key` (capibara_key_calls_total; one process here)."""
    calls = {}
    for family in text_string_to_metric_families(metrics_text(mesh)):
        for sample in family.samples:
            if sample.name == "capibara_key_calls_total" and sample.labels["key"] == key:
                method = f"{sample.labels['service'].rsplit('.', 1)[-1]}/{sample.labels['method']}"
                calls[(method, sample.labels["code"])] = sample.value
    return calls


def test_every_api_call_is_counted_per_key(mesh):
    before = key_calls(mesh, "carol")
    auth = {"x-api-key": CAROL_KEY}
    for _ in range(3):
        assert mesh.request("GET", "/api/models", headers=auth)[0] == 200
    assert mesh.request("POST", "/api/toon/encode", {"json": {"a": [1, 2]}}, headers=auth)[0] == 200
    assert mesh.request("POST", "/api/toon/decode", {"toon": "items[3]: 1,2"}, headers=auth)[0] == 400
    status, body, _ = mesh.request("POST", "/api/chat", HELLO, headers=auth)
    assert status == 200, body
    after = key_calls(mesh, "carol")
    grown = {call: after[call] - before.get(call, 0) for call in after if after[call] != before.get(call, 0)}
    assert grown == {
        ("InferenceService/ListModels", "OK"): 3,
        ("ContextService/EncodeToonJson", "OK"): 1,
        ("ContextService/DecodeToonJson", "INVALID_ARGUMENT"): 1,
        ("ChatService/Complete", "OK"): 1,
    }
    # The gateway's own calls to inference and context for that chat carry no key: not counted again.
    status_body = mesh.request("GET", "/api/status", headers=auth)[1]
    listed = {(row["method"], row["key"]): row for row in status_body["key_calls"]}
    row = listed[("ContextService/DecodeToonJson", "carol")]  # int64 fields are JSON strings
    decode_errors = after[("ContextService/DecodeToonJson", "INVALID_ARGUMENT")]
    assert (int(row["calls"]), int(row["errors"])) == (decode_errors, decode_errors)


def test_the_keys_never_appear_in_metrics_or_logs(mesh):
    # After at least one call per key (module order: the usage test ran; this call makes sure).
    for key in ALL_KEYS[2:]:
        assert mesh.request("GET", "/api/models", headers={"x-api-key": key})[0] == 200
    texts = {"gateway /metrics": metrics_text(mesh), "up.log": mesh.output()}
    state = pathlib.Path(mesh.config["state_dir"])
    texts.update({str(p): p.read_text(errors="replace") for p in state.rglob("*") if p.is_file()})
    assert any("alice" in text for text in texts.values())
    for where, text in texts.items():
        for key in ALL_KEYS:
            assert key not in text, f"an API key appears in {where}"


async def test_a_key_over_its_limit_is_refused_while_others_go_on(mesh):
    auth = {"x-api-key": TRIAL_KEY}
    chat = {**HELLO, "max_tokens": 1}
    assert [mesh.request("POST", "/api/chat", chat, headers=auth)[0] for _ in range(TRIAL_PER_MINUTE)] == [200] * 2
    status, body, headers = mesh.request("POST", "/api/chat/stream", chat, headers=auth)
    assert status == 429 and body["code"] == 8, body
    # The slowest refill of the route's buckets: trial's, one call back every 30 s.
    assert int(headers["retry-after"]) == 60 // TRIAL_PER_MINUTE
    async with edge_channel(mesh) as channel:
        stub = gateway_pb2_grpc.ChatServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as limited:
            await stub.Complete(gateway_pb2.CompleteRequest(**chat), timeout=30, metadata=(("x-api-key", TRIAL_KEY),))
        assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Another key, from the same address, in the same seconds.
        answer = await stub.Complete(
            gateway_pb2.CompleteRequest(**chat), timeout=60, metadata=(("x-api-key", CAROL_KEY),)
        )
        assert answer.model_id == MODEL
    assert mesh.request("POST", "/api/chat", chat, headers={"x-api-key": CAROL_KEY})[0] == 200
    # The OpenAI API has its own bucket per key, with the same limits.
    trial = openai_client(mesh, TRIAL_KEY)
    messages = [{"role": "user", "content": "Say hello."}]
    for _ in range(TRIAL_PER_MINUTE):
        trial.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as refused:
        trial.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert refused.value.status_code == 429 and int(refused.value.response.headers["retry-after"]) == 30
    carol = openai_client(mesh, CAROL_KEY).chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert carol.usage.completion_tokens >= 1
    # Calls the edge refused never reached the gateway: trial's count holds only its answers.
    assert key_samples(mesh)[("capibara_key_requests_total", "trial", MODEL, "OK")] == 2 * TRIAL_PER_MINUTE
