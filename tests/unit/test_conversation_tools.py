"""Conversation memory keeps tool calls and tool results: the SQLite store (a real file, also one
migrated from the previous schema), the history the context engine fits to the window (a tool
result never without its call), and the context service's AppendTurn / GetConversation / Enrich."""

from __future__ import annotations

import sqlite3

import grpc
import pytest

from capibara_grpc.chat.types import Message, ToolCall
from capibara_grpc.context.core import ContextEngine, turn_groups
from capibara_grpc.context.memory import SqliteStore, Turn
from capibara_grpc.errors import InvalidArgument
from capibara_grpc.stubs import context_pb2, inference_pb2
from tests.unit.fakes import context_service, mesh_config, status_of

CONFIG = mesh_config()
CALL = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
CALL2 = ToolCall("call_2", "get_time", '{"tz": "CET"}')


async def test_sqlite_keeps_tool_calls_and_results_in_order(tmp_path):
    store = SqliteStore(tmp_path / "c.sqlite3")
    await store.append("c", "user", "weather in Paris?", request_id="r1:user")
    await store.append("c", "assistant", "", "alpha", "r1:assistant", tool_calls=[CALL, CALL2])
    assert await store.append("c", "tool", "18 C", request_id="r2:tool:call_1", tool_call_id="call_1")
    assert await store.append("c", "tool", "", request_id="r2:tool:call_2", tool_call_id="call_2")
    # Each result of one request is its own key: a retry stores neither again.
    assert not await store.append("c", "tool", "18 C", request_id="r2:tool:call_1", tool_call_id="call_1")
    await store.append("c", "assistant", "18 C in Paris.", "alpha", "r2:assistant")
    turns = await store.turns("c")
    assert [(t.role, t.content, t.tool_calls, t.tool_call_id) for t in turns] == [
        ("user", "weather in Paris?", [], ""),
        ("assistant", "", [CALL, CALL2], ""),
        ("tool", "18 C", [], "call_1"),
        ("tool", "", [], "call_2"),
        ("assistant", "18 C in Paris.", [], ""),
    ]
    assert store.schema_version == 3
    await store.close()


async def test_a_sqlite_file_of_schema_2_is_migrated_in_place(tmp_path):
    path = tmp_path / "v2.sqlite3"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE turns (id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL, role TEXT NOT NULL,
                            content TEXT NOT NULL, model_id TEXT NOT NULL DEFAULT '', created_at TEXT NOT NULL,
                            request_id TEXT NOT NULL DEFAULT '');
        CREATE INDEX turns_by_conversation ON turns (conversation_id, id);
        CREATE UNIQUE INDEX turns_once_per_request ON turns (conversation_id, request_id) WHERE request_id <> '';
        INSERT INTO turns (conversation_id, role, content, model_id, created_at, request_id)
            VALUES ('old', 'user', 'hola', '', '2026-11-01T10:00:00.000+00:00', 'a:user'),
                   ('old', 'assistant', '¡Hola!', 'phi', '2026-11-01T10:00:01.000+00:00', 'a:assistant');
        PRAGMA user_version = 2;
    """)
    old.commit()
    old.close()
    store = SqliteStore(path)
    assert store.schema_version == 3
    assert await store.turns("old") == [
        Turn("user", "hola", "", "2026-11-01T10:00:00.000+00:00"),
        Turn("assistant", "¡Hola!", "phi", "2026-11-01T10:00:01.000+00:00"),
    ]
    assert not await store.append("old", "user", "hola", request_id="a:user")  # old keys still hold
    await store.append("old", "assistant", "", "phi", "b:assistant", tool_calls=[CALL])
    assert (await store.turns("old"))[-1].tool_calls == [CALL]
    await store.close()
    assert SqliteStore(path).schema_version == 3  # opening again migrates nothing


def test_turn_groups_keep_results_with_their_call_and_drop_orphans():
    user, text = Turn("user", "q", "", ""), Turn("assistant", "a", "m", "")
    calling = Turn("assistant", "", "m", "", [CALL, CALL2])
    r1, r2 = Turn("tool", "x", "", "", tool_call_id="call_1"), Turn("tool", "y", "", "", tool_call_id="call_2")
    orphan = Turn("tool", "z", "", "", tool_call_id="gone")
    assert turn_groups([orphan, user, calling, r1, r2, text, orphan]) == [[user], [calling, r1, r2], [text]]


class CharTokens:
    """One token per character; a window of `window` tokens."""

    def __init__(self, window: int):
        self.window = window

    async def count(self, model_id: str, text: str) -> int:
        return len(text)

    async def context_window(self, model_id: str) -> int:
        return self.window

    def estimated(self, model_id: str) -> bool:
        return False


async def engine_with(tmp_path, window: int, turns: list[tuple]) -> ContextEngine:
    store = SqliteStore(tmp_path / "fit.sqlite3")
    for role, content, calls, call_id in turns:
        await store.append("f", role, content, "alpha", tool_calls=calls, tool_call_id=call_id)
    config = mesh_config()
    config.models["alpha"].defaults.max_tokens = 10
    return ContextEngine(config, store, CharTokens(window))


CONVERSATION = [
    ("user", "u" * 40, [], ""),
    ("assistant", "", [CALL], ""),  # 12 + 17 + 2 * 8 = 45 tokens
    ("tool", "r" * 40, [], "call_1"),  # 48 tokens
    ("assistant", "a" * 40, [], ""),
]


async def test_history_gives_calls_and_results_back_as_messages(tmp_path):
    engine = await engine_with(tmp_path, 4000, CONVERSATION)
    result = await engine.enrich("next?", "f", model_id="alpha", system_prompt="")
    assert [(m.role, m.tool_calls, m.tool_call_id) for m in result.messages] == [
        ("user", [], ""),
        ("assistant", [CALL], ""),
        ("tool", [], "call_1"),
        ("assistant", [], ""),
        ("user", [], ""),
    ]
    await engine.store.close()


async def test_a_call_and_its_results_are_cut_together(tmp_path):
    # Room for the last answer (48) and the new message (13), not for the call and its result (93):
    # both go, never the call alone or the result alone.
    engine = await engine_with(tmp_path, 10 + 13 + 48 + 40, CONVERSATION)
    result = await engine.enrich("next?", "f", model_id="alpha", system_prompt="")
    assert [m.role for m in result.messages] == ["assistant", "user"]
    engine.tokens.window += 93  # now the group fits too, not the first user turn
    result = await engine.enrich("next?", "f", model_id="alpha", system_prompt="")
    assert [m.role for m in result.messages] == ["assistant", "tool", "assistant", "user"]
    await engine.store.close()


async def test_tool_results_follow_the_history_and_keep_their_call(tmp_path):
    engine = await engine_with(tmp_path, 10, CONVERSATION[:2])  # no room at all: the call is kept anyway
    results = [Message("tool", "18 C", tool_call_id="call_1")]
    got = await engine.enrich("u" * 40, "f", model_id="alpha", system_prompt="", tool_results=results)
    assert [(m.role, m.tool_calls) for m in got.messages] == [("assistant", [CALL]), ("tool", [])]
    engine.tokens.window = 4000
    got = await engine.enrich("u" * 40, "f", model_id="alpha", system_prompt="", tool_results=results)
    assert [m.role for m in got.messages] == ["user", "assistant", "tool"]
    await engine.store.close()


@pytest.mark.parametrize(
    "turns, call_ids, words",
    [
        ([("user", "q", [], "")], ["call_1"], "has no tool calls"),
        (CONVERSATION[:2], ["call_9"], "answers none of the conversation's open tool calls (call_1)"),
        (CONVERSATION[:2], ["call_1", "call_1"], "answers none"),
        (CONVERSATION[:3], ["call_1"], "answers none of the conversation's open tool calls (none left)"),
        (CONVERSATION, ["call_1"], "already answered"),
    ],
)
async def test_tool_results_must_answer_the_newest_open_calls(tmp_path, turns, call_ids, words):
    engine = await engine_with(tmp_path, 4000, turns)
    results = [Message("tool", "r", tool_call_id=i) for i in call_ids]
    with pytest.raises(InvalidArgument, match="messages: .*" + words.replace("(", r"\(").replace(")", r"\)")):
        await engine.enrich("q", "f", model_id="alpha", tool_results=results)
    await engine.store.close()


@pytest.fixture
async def context(tmp_path):
    async with context_service(CONFIG, tmp_path / "conversations.sqlite3") as stub:
        yield stub


async def test_the_service_stores_and_shows_tool_turns(context):
    calls = [inference_pb2.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')]
    for request in (
        context_pb2.AppendTurnRequest(conversation_id="t", role=inference_pb2.ROLE_USER, content="weather?"),
        context_pb2.AppendTurnRequest(conversation_id="t", role=inference_pb2.ROLE_ASSISTANT, tool_calls=calls),
    ):
        assert (await context.AppendTurn(request, timeout=5)).stored
    tool = inference_pb2.ChatMessage(role=inference_pb2.ROLE_TOOL, content="18 C", tool_call_id="call_1")
    enriched = await context.Enrich(
        context_pb2.EnrichRequest(message="weather?", conversation_id="t", model_id="alpha", tool_results=[tool]),
        timeout=5,
    )
    assert [(m.role, list(m.tool_calls), m.tool_call_id) for m in enriched.messages[1:]] == [
        (inference_pb2.ROLE_USER, [], ""),
        (inference_pb2.ROLE_ASSISTANT, calls, ""),
        (inference_pb2.ROLE_TOOL, [], "call_1"),
    ]
    request = context_pb2.AppendTurnRequest(
        conversation_id="t", role=inference_pb2.ROLE_TOOL, content="18 C", tool_call_id="call_1", request_id="r:tool"
    )
    assert (await context.AppendTurn(request, timeout=5)).stored
    assert not (await context.AppendTurn(request, timeout=5)).stored
    turns = (await context.GetConversation(context_pb2.GetConversationRequest(conversation_id="t"), timeout=5)).turns
    assert [(t.role, list(t.tool_calls), t.tool_call_id) for t in turns] == [
        (inference_pb2.ROLE_USER, [], ""),
        (inference_pb2.ROLE_ASSISTANT, calls, ""),
        (inference_pb2.ROLE_TOOL, [], "call_1"),
    ]


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"role": inference_pb2.ROLE_TOOL, "content": "x"}, "tool_call_id is required"),
        ({"role": inference_pb2.ROLE_USER, "content": "x", "tool_call_id": "c"}, "tool_call_id is required"),
        (
            {"role": inference_pb2.ROLE_USER, "content": "x", "tool_calls": [inference_pb2.ToolCall(id="c", name="f")]},
            "tool_calls: only an assistant",
        ),
        ({"role": inference_pb2.ROLE_ASSISTANT}, "conversation_id, a user, assistant or tool role and content"),
    ],
)
async def test_append_turn_refuses_malformed_tool_turns(context, fields, words):
    code, details = await status_of(context.AppendTurn(context_pb2.AppendTurnRequest(conversation_id="t", **fields)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(words), details


async def test_calls_that_got_no_result_are_left_out(tmp_path):
    """The client asked something else instead of answering the calls: the model is not shown calls
    without results (an OpenAI-compatible server refuses them); a partly answered turn keeps the
    answered call."""
    engine = await engine_with(tmp_path, 4000, [*CONVERSATION[:2], ("assistant", "Let me check.", [CALL2], "")])
    result = await engine.enrich("never mind", "f", model_id="alpha", system_prompt="")
    assert [(m.role, m.content, m.tool_calls) for m in result.messages] == [
        ("user", "u" * 40, []),
        ("assistant", "Let me check.", []),
        ("user", "never mind", []),
    ]
    await engine.store.close()
    engine = await engine_with(tmp_path / "partly", 4000, [CONVERSATION[0], ("assistant", "", [CALL, CALL2], "")])
    results = [Message("tool", "18 C", tool_call_id="call_1")]
    got = await engine.enrich("q", "f", model_id="alpha", system_prompt="", tool_results=results)
    assert [(m.role, m.tool_calls) for m in got.messages][1:] == [("assistant", [CALL]), ("tool", [])]
    await engine.store.close()
