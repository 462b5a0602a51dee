"""API key names and ids (keys file and $CAPIBARA_API_KEYS), and usage counted per key by the
gateway's servicers over real gRPC (fake models; the edge, which sets the key id, is in
tests/test_key_usage.py)."""

from __future__ import annotations

import hashlib

import grpc
import pytest
from capibara_gateway.core import ChatGateway
from capibara_gateway.servicer import ChatServicer

from capibara_grpc.api_keys import key_usage, short_id, split_named_key
from capibara_grpc.config import ConfigError, parse_config
from capibara_grpc.config.validation import api_key_ids
from capibara_grpc.errors import Unavailable
from capibara_grpc.stubs import gateway_pb2, gateway_pb2_grpc
from capibara_grpc.tracing import KEY_ID_HEADER
from tests.unit.fakes import FakeModels, Model, mesh_config, serving, status_of

KEY = "key-0123456789abcdef"
OTHER = "other-0123456789abcdef"
GOOD = """\
models:
  phi:
    backend: {url: "http://127.0.0.1:8081", protocol: llama_cpp}
gateway:
  default_model: phi
router:
  enabled: false
"""


def test_a_key_may_have_a_name():
    assert split_named_key(f"alice: {KEY}") == ("alice", KEY)
    assert split_named_key(f" team.a-1 :{KEY} ") == ("team.a-1", KEY)
    assert split_named_key(KEY) == ("", KEY)
    for bad in (f": {KEY}", f"two words: {KEY}", f"-dash: {KEY}", f"{'n' * 65}: {KEY}"):
        with pytest.raises(ValueError, match="name"):
            split_named_key(bad)


def test_an_unnamed_key_is_known_by_the_start_of_its_sha256():
    assert short_id(KEY) == hashlib.sha256(KEY.encode()).hexdigest()[:8]
    assert len(short_id(OTHER)) == 8 and short_id(OTHER) != short_id(KEY)


def config_with_keys(tmp_path, lines: str, extra: str = ""):
    (tmp_path / "keys.txt").write_text(lines)
    return parse_config(GOOD + f"edge:\n  api_keys_file: {tmp_path / 'keys.txt'}\n{extra}", source="mesh.yaml")


def test_keys_file_and_environment_give_each_key_its_id(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPIBARA_API_KEYS", f"bob: {OTHER}")
    config = config_with_keys(tmp_path, f"# name: key\nalice: {KEY}  # the first\n\nno-name-0123456789abcdef\n")
    assert api_key_ids(config) == {
        KEY: "alice",
        "no-name-0123456789abcdef": short_id("no-name-0123456789abcdef"),
        OTHER: "bob",
    }


@pytest.mark.parametrize(
    "lines, extra, message",
    [
        (f"alice: {KEY}\nalice: {OTHER}\n", "", "keys.txt:2: two keys are called 'alice'"),
        (f"alice: {KEY}\nbob: {KEY}\n", "", "keys.txt:2: this key is listed twice, as 'alice' and as 'bob'"),
        ("alice:\n", "", "keys.txt:1: the name 'alice' has no key after it"),
        (f"al ice: {KEY}\n", "", "keys.txt:1: the key's name 'al ice' must be 1 to 64 characters"),
        (
            f"alice: {KEY}\n",
            "  key_rate_limit: {chat_overrides: {alcie: 5}}\n",
            "mesh.yaml:10: edge.key_rate_limit.chat_overrides: no API key is called alcie (keys: alice)",
        ),
    ],
)
def test_bad_key_lines_name_the_line_and_never_the_key(tmp_path, lines, extra, message):
    with pytest.raises(ConfigError) as error:
        config_with_keys(tmp_path, lines, extra)
    assert message in str(error.value)
    assert KEY not in str(error.value) and OTHER not in str(error.value)


def test_a_negative_key_limit_is_refused():
    with pytest.raises(ConfigError, match="edge.key_rate_limit.chat_overrides.trial must be 0"):
        parse_config(GOOD + "edge:\n  key_rate_limit: {chat_overrides: {trial: -1}}\n", source="mesh.yaml")


def usage_of(key: str) -> dict[str, dict]:
    return {row["model"]: row for row in key_usage() if row["key"] == key}


async def test_the_gateway_counts_calls_tokens_and_errors_per_key():
    models = FakeModels(
        alpha=Model(),
        beta=Model(fail_first=Unavailable("beta is down")),
        gamma=Model(fail_after=1, fail_with=Unavailable("backend died")),
    )

    def add(server):
        gateway_pb2_grpc.add_ChatServiceServicer_to_server(
            ChatServicer(ChatGateway(mesh_config(), models.generate)), server
        )

    async with serving(add) as channel:
        chat = gateway_pb2_grpc.ChatServiceStub(channel)
        as_carol = ((KEY_ID_HEADER, "carol-unit"),)
        answer = await chat.Complete(gateway_pb2.CompleteRequest(message="hola", model="alpha"), metadata=as_carol)
        events = [e async for e in chat.Chat(gateway_pb2.ChatRequest(message="hola", model="alpha"), metadata=as_carol)]
        done = events[-1].done
        # Before the first token: a status; after it: the in-band error's code.
        assert (
            await status_of(chat.Complete(gateway_pb2.CompleteRequest(message="hola", model="beta"), metadata=as_carol))
        )[0] == grpc.StatusCode.UNAVAILABLE
        [e async for e in chat.Chat(gateway_pb2.ChatRequest(message="hola", model="gamma"), metadata=as_carol)]
        # A model nobody configured is not a label.
        await status_of(chat.Complete(gateway_pb2.CompleteRequest(message="hola", model="made-up"), metadata=as_carol))
        # Without the edge's header (a mesh without keys): not counted.
        await chat.Complete(gateway_pb2.CompleteRequest(message="hola", model="alpha"))

    usage = usage_of("carol-unit")
    assert usage["alpha"]["requests"] == 2 and usage["alpha"]["errors"] == 0
    assert usage["alpha"]["prompt_tokens"] == answer.usage.prompt_tokens + done.usage.prompt_tokens
    assert usage["alpha"]["completion_tokens"] == answer.usage.completion_tokens + done.usage.completion_tokens
    assert usage["alpha"]["completion_tokens"] > 0
    assert usage["beta"]["requests"] == usage["beta"]["errors"] == 1
    assert usage["gamma"]["requests"] == usage["gamma"]["errors"] == 1
    assert usage["-"]["requests"] == usage["-"]["errors"] == 1 and "made-up" not in usage
    assert set(usage) == {"alpha", "beta", "gamma", "-"}
