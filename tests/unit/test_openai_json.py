"""The /v1 path's JSON (openai_api.loads and dumps) is orjson where orjson gives what json gives,
and json's own answer everywhere else: the same values, the same bytes, the same errors."""

from __future__ import annotations

import json
import random
import struct

import pytest
from capibara_gateway import openai_api
from capibara_gateway.events import ChatDone, RoutingDecision, ToolStep

from capibara_grpc.chat.types import Finished, ToolCallDelta
from tests.unit.fakes import mesh_config

CONFIG = mesh_config()
MODEL = next(iter(CONFIG.models))


def outcome(function, *args):
    try:
        value = function(*args)
    except Exception as exc:  # noqa: BLE001 (the error is what is compared)
        return ("error", type(exc), str(exc))
    return ("value", repr(value), json.dumps(value, sort_keys=False, default=repr) if value == value else "nan")


def _random_floats(count: int) -> list[float]:
    rng = random.Random(29)
    floats = [struct.unpack("<d", rng.randbytes(8))[0] for _ in range(count)]
    floats += [rng.uniform(-1, 1) * 10 ** rng.randint(-12, 20) for _ in range(count)]
    return floats + [0.0, -0.0, 1e-4, 9.999e-5, 1e16, 9999999999999998.0, 5e-324, 1.7976931348623157e308]


BODIES = [
    b'{"model":"phi","messages":[{"role":"user","content":"hello there"}],"max_tokens":8}',
    '{"messages":[{"content":"¿Qué tal? 😀 \\u00e9 \\ud83d\\ude00 \\n\\t"}]}'.encode(),
    b'{"max_tokens": 1' + b"0" * 400 + b"}",  # json keeps it exact: the chat core refuses it (400)
    b'{"seed": 18446744073709551616}',
    b'{"seed": -9223372036854775809}',
    b'{"seed": 1234567890123456789}',
    b'{"temperature": NaN}',
    b'{"temperature": Infinity}',
    b'{"temperature": -Infinity}',
    b'{"temperature": 1e400}',
    b'{"temperature": 1e-400}',
    b'{"a": "\\ud800"}',  # a lone surrogate: json takes it
    b'\xef\xbb\xbf{"a": 1}',  # a byte order mark: json takes it
    '{"a": 1}'.encode("utf-16"),
    '{"a": 1}'.encode("utf-32-le"),
    b'{"a": "\xed\xa0\x80"}',  # an encoded surrogate: json takes it too
    b'{"a": "\xff"}',
    b"",
    b"{",
    b'{"a": 1,}',
    b"[1, 2",
    b'{"a": 1, "b": 2, "a": 3}',
    b'{"a": "\x01"}',
    b"[" * 2000 + b"]" * 2000,
    b'{"a": 01}',
    b" \t\r\n[1.0, -0, -0.0, 1E2, 2.2250738585072011e-308]",
] + [repr(f).encode() for f in _random_floats(300) if f == f and abs(f) != float("inf")]


@pytest.mark.parametrize("raw", BODIES, ids=range(len(BODIES)))
def test_loads_gives_json_loads_value_or_error(raw):
    assert outcome(openai_api.loads, raw) == outcome(json.loads, raw)


def test_a_huge_integer_stays_an_exact_integer_for_the_chat_cores_range_check():
    # orjson would make it a float; json keeps 10**400, which the core refuses as a 400 naming
    # max_tokens (test_openai_api.py::test_what_is_not_supported_is_refused_naming_the_field).
    raw = b'{"model":"%s","messages":[{"role":"user","content":"hi"}],"max_tokens":1%s}' % (MODEL.encode(), b"0" * 400)
    assert openai_api.parse_chat_request(raw, CONFIG).chat.params.max_tokens == 10**400


def compact(payload) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def _payloads() -> list:
    decision = RoutingDecision(MODEL, "chat", 0.8731, "router", "because", failed_models=["x"])
    done = ChatDone(Finished("stop", 12, 8, model_id=MODEL, reasoning_tokens=3), 1.0)
    step = ToolStep("weather__get", '{"city":"Paris"}', "sunny", False, 12.34, "weather", "get")
    completion = openai_api.Completion(MODEL)
    payloads = [
        completion.response("Hello! ¿Qué tal? 😀", decision, done, "thinking", tool_steps=[step]),
        completion.first_chunk(decision, True),
        completion.chunk({"content": ' hola\n\t"\\/\x00\x1f\x7f\u2028'}),
        *completion.tool_call_chunks(ToolCallDelta(0, "call_1", "get", '{"a":'), False),
        completion.tool_step_chunk(step, True),
        completion.last_chunk(done, True),
        completion.usage_chunk(done),
        openai_api.stream_error("INTERNAL", "boom"),
        {"object": "list", "data": openai_api.model_list(CONFIG, True)},
        {"text": "".join(map(chr, range(0x800)))},
        {"tuple": (1, 2.5, None, True, False, "x")},
        {"big": 2**64, "small": -(2**63) - 1, "ok": 2**63 - 1},
        {"nan": float("nan")},
        {"inf": [float("inf"), float("-inf")]},
        {"small float": 1e-05, "tiny": 1.5e-07, "large": 1e16, "larger": 1.5e17},
        {"lone surrogate": "\ud800"},
        {1: "int key"},
        {"nested": [[[[{"a": [0.5]}]]]]},
        {"set": {1, 2}},
    ]
    return payloads + [{"f": f} for f in _random_floats(300)]


@pytest.mark.parametrize("payload", _payloads(), ids=lambda p: repr(p)[:40])
def test_dumps_gives_json_dumps_bytes_or_error(payload):
    assert outcome(openai_api.dumps, payload) == outcome(compact, payload)


def test_sse_frames_are_unchanged():
    chunk = openai_api.Completion(MODEL).chunk({"content": "é"})
    assert openai_api.sse(chunk) == b"data: " + compact(chunk) + b"\n\n"
    assert openai_api.sse("[DONE]") == b"data: [DONE]\n\n"
