"""Context service: relevance of each provider, data in TOON, memory, trimming, erase, bad input;
TOON over REST and gRPC: key order both ways, every option of the spec, bad options.

Over 400 lines: every test here shares one module-scoped mesh; split in two files, the suite would
start a second mesh for nothing."""

from __future__ import annotations

import asyncio
import datetime
import json
import pathlib
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import pytest
import yaml

from capibara_grpc.context import providers
from capibara_grpc.stubs import context_pb2, context_pb2_grpc, inference_pb2
from tests.support.channels import edge_channel

BIN = pathlib.Path(sys.executable).parent


@pytest.mark.parametrize(
    "message, needed",
    [
        ("qué día es hoy", True),
        ("que fecha es hoy?", True),
        ("¿qué hora es?", True),
        ("how many days until Christmas", True),
        ("what day is it today", True),
        ("cuántos días faltan para navidad", True),
        ("en qué año estamos", True),
        ("qué es Python", False),
        ("escribe un poema sobre el día", False),
        ("What is a date palm?", False),
        ("cuéntame la historia de Roma", False),
        ("my birthday is on 1990-05-01", False),
    ],
)
def test_datetime_only_when_the_question_depends_on_it(message, needed):
    addition = providers.datetime_context(
        message, "Europe/Madrid", datetime.datetime(2026, 12, 20, 9, 30, tzinfo=datetime.UTC)
    )
    assert (addition is not None) == needed
    if needed:
        assert "2026-12-20 10:30" in addition.content and "Sunday" in addition.content


@pytest.mark.parametrize(
    "message, needed",
    [
        ("¿quién eres?", True),
        ("como te llamas", True),
        ("who made you?", True),
        ("what are you?", True),
        ("eres un robot?", True),
        ("tell me about yourself", True),
        ("qué es Python", False),
        ("creo que va a llover", False),
        ("que es la fotosintesis", False),
        ("who wrote Hamlet?", False),
        ("what is your favourite colour of car to recommend", False),
    ],
)
def test_identity_only_when_the_user_asks_about_the_assistant(message, needed):
    assert (providers.identity_context(message, "Capibara", "A helpful assistant.") is not None) == needed


@pytest.mark.parametrize(
    "message, fact",
    [
        ("cuánto es 345 por 27", "= 9315"),
        ("what is 2^10 + 3?", "= 1027"),
        ("(3+4)*2", "= 14"),
        ("calcula 1250 entre 25", "= 50"),
        ("what's 7 minus 10", "= -3"),
        ("0,5 + 0,25", "= 0.75"),
    ],
)
def test_arithmetic_is_computed_exactly(message, fact):
    addition = providers.arithmetic_context(message)
    assert addition is not None and fact in addition.content


@pytest.mark.parametrize(
    "message",
    [
        "tengo 3 gatos y 2 perros",
        "nací en 1990-05-01",
        "__import__('os').system('ls')",
        "2**99999",
        "1/0",
        "qué es Python",
        "9" * 400 + "**9",
    ],
)
def test_arithmetic_adds_nothing_for_non_arithmetic_or_unsafe_input(message):
    assert providers.arithmetic_context(message) is None


def test_safe_eval_refuses_anything_but_arithmetic():
    for bad in ["__import__('os')", "open('x')", "[1, 2]", "a + 1", "(lambda: 1)()", "2 ** 1000"]:
        with pytest.raises((ValueError, SyntaxError)):
            providers.safe_eval(bad)
    assert providers.safe_eval("-(2 + 3) * 4 % 7") == 1


def enrich(mesh, body):
    return mesh.request("POST", "/api/context/enrich", body)


def test_enrich_over_rest_adds_what_the_question_needs(mesh):
    status, body, _ = enrich(mesh, {"message": "¿qué día es hoy?", "model_id": "phi"})
    assert status == 200, body
    (date,) = [a for a in body["added_context"] if a["kind"] == "datetime"]
    assert datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d") in date["content"]
    assert date["reason"]
    assert body["messages"][0]["role"] == "ROLE_SYSTEM" and date["content"] in body["messages"][0]["content"]
    assert body["messages"][-1] == {"role": "ROLE_USER", "content": "¿qué día es hoy?"}
    status, body, _ = enrich(mesh, {"message": "qué es Python", "model_id": "phi"})
    assert status == 200 and body["added_context"] == []
    status, body, _ = enrich(mesh, {"message": "cuánto es 345 por 27"})
    assert [a["kind"] for a in body["added_context"]] == ["arithmetic"] and "9315" in body["prompt"]


def test_uniform_records_go_in_as_toon_with_fewer_tokens(mesh):
    rows = [
        {"id": i, "name": f"user{i}", "role": "admin" if i % 3 == 0 else "member", "active": i % 2 == 0}
        for i in range(30)
    ]
    status, body, _ = enrich(mesh, {"message": "¿Cuántos usuarios activos hay?", "data": {"users": rows}})
    assert status == 200, body
    (data,) = [a for a in body["added_context"] if a["kind"] == "data"]
    # (EnrichRequest.data is a google.protobuf.Struct, which does not keep key order: the columns
    # may come in any order)
    assert "TOON" in data["content"] and "users[30]{" in data["content"]
    # The delimiter that costs fewest tokens was chosen, with every candidate's count given.
    counts = {
        form: int(data["reason"].split(f"{form} ")[1].split(",")[0].split(")")[0])
        for form in ("TOON comma", "TOON tab", "TOON pipe", "JSON")
    }
    chosen = data["content"].split("-delimited")[0].split("TOON, ")[1]
    assert counts[f"TOON {chosen}"] == min(counts.values()), (counts, chosen)
    delimiter = {"comma": ",", "tab": "\t", "pipe": "|"}[chosen]
    assert f"users[30{'' if chosen == 'comma' else delimiter}]{{" in data["content"]
    status, encoded, _ = mesh.request("POST", "/api/toon/encode", {"json": {"users": rows}})
    assert status == 200
    assert encoded["toon_tokens"] < encoded["json_tokens"] and encoded["savings"] > 0.2


def test_data_json_keeps_key_order_in_the_prompt(mesh):
    rows = [{"zeta": i, "alpha": f"row {i}", "mid": i % 2 == 0} for i in range(12)]
    body = {"message": "resume", "model_id": "phi", "data_json": json.dumps({"rows": rows})}
    status, body, _ = enrich(mesh, body)
    assert status == 200, body
    (data,) = [a for a in body["added_context"] if a["kind"] == "data"]
    assert "TOON" in data["content"] and "]{zeta" in data["content"] and "alpha" in data["content"].split("}")[0]
    status, error, _ = enrich(mesh, {"message": "resume", "data_json": '{"rows": [1,]}'})
    assert status == 400 and "data_json at line 1, column 13" in error["message"], error


def test_toon_round_trips_through_rest(mesh):
    value = {
        "order": {
            "id": 17,
            "items": [{"sku": "A1", "qty": 2, "price": 9.5}, {"sku": "B2", "qty": 1, "price": 20}],
            "tags": ["gift", "express"],
            "note": "llamar antes, por favor",
            "paid": True,
            "coupon": None,
        }
    }
    status, encoded, _ = mesh.request("POST", "/api/toon/encode", {"json": value})
    assert status == 200, encoded
    status, decoded, _ = mesh.request("POST", "/api/toon/decode", {"toon": encoded["toon"]})
    assert status == 200, decoded
    assert decoded["json"] == value


# Keys in non-sorted order at every depth: a nested object, a tabular array (its header follows
# the first object's field order), an array of objects whose keys differ (a list), a primitive array.
ORDERED = (
    '{"zeta":{"mid":1,"alpha":{"z":true,"b":null,"a":"x"}},'
    '"rows":[{"sku":"B2","qty":1,"id":7},{"sku":"A1","qty":2,"id":3}],'
    '"mixed":[{"w":1,"c":2},{"c":3,"b":4,"w":5}],'
    '"beta":[3,1,2],"alpha":"último"}'
)
ORDERED_TOON = (
    "zeta:\n  mid: 1\n  alpha:\n    z: true\n    b: null\n    a: x\n"
    "rows[2]{sku,qty,id}:\n  B2,1,7\n  A1,2,3\n"
    "mixed[2]:\n  - w: 1\n    c: 2\n  - c: 3\n    b: 4\n    w: 5\n"
    "beta[3]: 3,1,2\nalpha: último"
)


def raw_request(mesh, path: str, data: bytes, content_type: str = "application/json"):
    """(status, body bytes) of a REST call, the body exactly as the edge sent it."""
    request = urllib.request.Request(
        mesh.base_url + path, data=data, method="POST", headers={"content-type": content_type}
    )
    try:
        with urllib.request.urlopen(request, context=mesh.ssl_context(), timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_key_order_is_kept_both_ways_over_rest_byte_for_byte(mesh):
    status, body = raw_request(mesh, "/api/toon/encode", b'{"json": ' + ORDERED.encode() + b', "model_id": "phi"}')
    assert status == 200, body
    encoded = json.loads(body)
    assert encoded["toon"] == ORDERED_TOON
    assert list(encoded) == ["toon", "json_tokens", "toon_tokens", "savings"]
    status, body = raw_request(mesh, "/api/toon/decode", json.dumps({"toon": encoded["toon"]}).encode())
    assert status == 200, body
    assert body == b'{"json":' + ORDERED.encode() + b"}"  # JSON -> TOON -> JSON, byte for byte
    # The TOON document itself as text/plain decodes the same.
    status, plain_body = raw_request(mesh, "/api/toon/decode", ORDERED_TOON.encode(), "text/plain; charset=utf-8")
    assert status == 200 and plain_body == body


async def test_key_order_is_kept_both_ways_over_grpc(mesh):
    async with edge_channel(mesh) as channel:
        stub = context_pb2_grpc.ContextServiceStub(channel)
        encoded = await stub.EncodeToon(context_pb2.EncodeToonRequest(json_text=ORDERED, model_id="phi"), timeout=30)
        assert encoded.toon == ORDERED_TOON and encoded.toon_tokens < encoded.json_tokens
        decoded = await stub.DecodeToon(context_pb2.DecodeToonRequest(toon=encoded.toon), timeout=30)
        assert decoded.json_text == ORDERED
        # Options over gRPC too.
        options = context_pb2.ToonEncodeOptions(delimiter="|", indent=4, key_folding="safe")
        folded = await stub.EncodeToon(context_pb2.EncodeToonRequest(json_text='{"a":{"b":[1,2]}}', options=options))
        assert folded.toon == "a.b[2|]: 1|2"
        expanded = await stub.DecodeToon(
            context_pb2.DecodeToonRequest(
                toon=folded.toon, options=context_pb2.ToonDecodeOptions(expand_paths="safe", strict=False)
            )
        )
        assert expanded.json_text == '{"a":{"b":[1,2]}}'
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.EncodeToon(
                context_pb2.EncodeToonRequest(json_text="[1]", options=context_pb2.ToonEncodeOptions(delimiter=";"))
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "delimiter" in error.value.details()


NESTED = {"user": {"profile": {"name": "Ada", "tags": ["a", "b"]}}, "n": 1}


@pytest.mark.parametrize(
    "options, expected",
    [
        ({}, "user:\n  profile:\n    name: Ada\n    tags[2]: a,b\nn: 1"),
        ({"indent": 4}, "user:\n    profile:\n        name: Ada\n        tags[2]: a,b\nn: 1"),
        ({"indentSize": 3}, "user:\n   profile:\n      name: Ada\n      tags[2]: a,b\nn: 1"),
        ({"delimiter": "\t"}, "user:\n  profile:\n    name: Ada\n    tags[2\t]: a\tb\nn: 1"),
        ({"delimiter": "|"}, "user:\n  profile:\n    name: Ada\n    tags[2|]: a|b\nn: 1"),
        ({"delimiter": "tab"}, "user:\n  profile:\n    name: Ada\n    tags[2\t]: a\tb\nn: 1"),
        ({"delimiter": ","}, "user:\n  profile:\n    name: Ada\n    tags[2]: a,b\nn: 1"),
        ({"keyFolding": "off"}, "user:\n  profile:\n    name: Ada\n    tags[2]: a,b\nn: 1"),
        ({"keyFolding": "safe"}, "user.profile:\n  name: Ada\n  tags[2]: a,b\nn: 1"),
        ({"key_folding": "safe", "flatten_depth": 1}, "user:\n  profile:\n    name: Ada\n    tags[2]: a,b\nn: 1"),
    ],
)
def test_each_encoder_option_over_rest(mesh, options, expected):
    status, body, _ = mesh.request("POST", "/api/toon/encode", {"json": NESTED, "options": options})
    assert status == 200, body
    assert body["toon"] == expected


def test_flatten_depth_over_rest(mesh):
    value = {"a": {"b": {"c": {"d": 1}}}}
    expected = {None: "a.b.c.d: 1", 2: "a.b:\n  c:\n    d: 1", 3: "a.b.c:\n  d: 1", 0: "a:\n  b:\n    c:\n      d: 1"}
    for depth, toon in expected.items():
        options = {"keyFolding": "safe", "flattenDepth": depth}
        status, body, _ = mesh.request("POST", "/api/toon/encode", {"json": value, "options": options})
        assert status == 200 and body["toon"] == toon, (depth, body)


@pytest.mark.parametrize(
    "toon, options, expected",
    [
        ("a:\n    b: 1", {"indent": 4}, {"a": {"b": 1}}),
        ("a:\n   b: 1", {"indentSize": 3}, {"a": {"b": 1}}),
        ("tags[3]: a,b", {"strict": False}, {"tags": ["a", "b"]}),
        ("a: 1\na: 2", {"strict": False}, {"a": 2}),
        ("user.name: Ada\nuser.id: 1", {"expandPaths": "safe"}, {"user": {"name": "Ada", "id": 1}}),
        ("user.name: Ada", {"expand_paths": "off"}, {"user.name": "Ada"}),
        ('a.b: 1\n"c.d": 2', {"expandPaths": "safe"}, {"a": {"b": 1}, "c.d": 2}),
        ("a.b: 1\na: 2", {"expandPaths": "safe", "strict": False}, {"a": 2}),
    ],
)
def test_each_decoder_option_over_rest(mesh, toon, options, expected):
    status, body, _ = mesh.request("POST", "/api/toon/decode", {"toon": toon, "options": options})
    assert status == 200, body
    assert body["json"] == expected and json.dumps(body["json"]) == json.dumps(expected)


@pytest.mark.parametrize(
    "path, options, words",
    [
        ("encode", {"delimiter": ";"}, ["options.delimiter", '";"']),
        ("encode", {"delimiter": "  "}, ["options.delimiter"]),
        ("encode", {"indent": 0}, ["options.indent", "0"]),
        ("encode", {"indent": "2"}, ["options.indent", '"2"']),
        ("encode", {"indent": 2.5}, ["options.indent", "2.5"]),
        ("encode", {"keyFolding": "yes"}, ["options.keyFolding", '"yes"']),
        ("encode", {"flattenDepth": -1}, ["options.flattenDepth", "-1"]),
        ("encode", {"flattenDepth": True}, ["options.flattenDepth", "true"]),
        ("encode", {"sortKeys": True}, ["unknown option 'sortKeys'"]),
        ("encode", [1], ["options must be an object"]),
        ("decode", {"strict": "no"}, ["options.strict", '"no"']),
        ("decode", {"expandPaths": "on"}, ["options.expandPaths", '"on"']),
        ("decode", {"indent": 99}, ["options.indent", "99"]),
        ("decode", {"delimiter": "|"}, ["unknown option 'delimiter'"]),
    ],
)
def test_a_bad_option_value_is_400_naming_it(mesh, path, options, words):
    body = {"json": {"a": 1}} if path == "encode" else {"toon": "a: 1"}
    status, error, _ = mesh.request("POST", f"/api/toon/{path}", {**body, "options": options})
    assert status == 400, error
    assert all(w in error["message"] for w in words), error["message"]


def test_decode_errors_name_the_line_and_what_is_wrong(mesh):
    for toon, options, words in [
        ("a:\n   b: 1", {}, ["line 2", "indent"]),
        ("a.b: 1\na: 2", {"expandPaths": "safe"}, ["conflict", "'a'"]),
        ("rows[2]{id,name}:\n  1,Ana\n  2", {}, ["line 3"]),
    ]:
        status, error, _ = mesh.request("POST", "/api/toon/decode", {"toon": toon, "options": options})
        assert status == 400, error
        assert all(w in error["message"].lower() for w in words), error["message"]
    status, error = raw_request(mesh, "/api/toon/encode", b'{\n  "json": [1,, 2]\n}')
    assert status == 400 and b"line 2, column 14" in error, error


@pytest.mark.parametrize(
    "path, body, words",
    [
        ("/api/toon/decode", {"toon": "users[2]{id,name}:\n  1,Ana\n  2"}, "line 3"),
        ("/api/toon/decode", {}, "toon is required"),
        ("/api/toon/decode", {"toon": "a: 1", "tone": 1}, "unknown field 'tone'"),
        ("/api/toon/encode", {"jsn": {"a": 1}}, "unknown field 'jsn'"),
        ("/api/toon/encode", {"model_id": "phi"}, "json is required"),
        ("/api/toon/encode", {"json": {"a": 1}, "model_id": "gpt-5"}, "unknown model"),
        ("/api/context/enrich", {"message": "  "}, "empty"),
        ("/api/context/enrich", {"message": "hola", "model_id": "gpt-5"}, "unknown model"),
        (
            "/api/context/enrich",
            {"message": "resume", "data": {"rows": [{"id": i, "text": "palabra " * 20} for i in range(60)]}},
            "over the budget",
        ),
    ],
)
def test_bad_context_input_is_400_or_404_with_a_reason(mesh, path, body, words):
    status, error, _ = mesh.request("POST", path, body)
    assert status in (400, 404), error
    assert words in error["message"]


@pytest.mark.parametrize(
    "data_text, where, what",
    [
        ('{\n    "rows": [1, 2,, 3]\n  }', "line 5, column 19", "unexpected ','"),
        ("{\n    \"name\": 'Ana'\n  }", "line 5, column 13", "double quotes"),
        ('{\n    "a": 1,\n  }', "line 6, column 3", "field name in double quotes"),
        ('{\n    "note": "no closing quote\n  }', "line 5, column 30", "control character"),
    ],
)
def test_invalid_json_in_data_names_line_and_column(mesh, data_text, where, what):
    raw = ('{\n  "message": "resume esto",\n  "model_id": "phi",\n  "data": ' + data_text + "\n}").encode()
    status, error, headers = mesh.request("POST", "/api/context/enrich", raw=raw)
    assert status == 400, error
    assert headers["content-type"].startswith("application/json")
    assert where in error["message"] and what in error["message"], error["message"]


def test_chat_turns_are_remembered_read_and_erased(mesh):
    conversation = "memory-test-1"
    for message in ("Me llamo Ana y vivo en Quito.", "¿Cómo me llamo?"):
        status, body, _ = mesh.request(
            "POST",
            "/api/chat",
            {"message": message, "conversation_id": conversation, "max_tokens": 8, "temperature": 0},
        )
        assert status == 200, body
    status, body, _ = mesh.request("GET", f"/api/conversations/{conversation}")
    assert status == 200
    turns = body["turns"]
    assert [t["role"] for t in turns] == ["ROLE_USER", "ROLE_ASSISTANT"] * 2
    assert turns[0]["content"] == "Me llamo Ana y vivo en Quito."
    assert turns[1]["content"] and turns[1]["model_id"]
    # The second question was sent with the first exchange as history.
    status, enriched, _ = enrich(mesh, {"message": "¿Y dónde vivo?", "conversation_id": conversation})
    assert any(a["kind"] == "history" for a in enriched["added_context"])
    assert "Me llamo Ana" in enriched["prompt"]
    status, deleted, _ = mesh.request("DELETE", f"/api/conversations/{conversation}")
    assert status == 200 and deleted["deleted_turns"] == 4
    status, body, _ = mesh.request("GET", f"/api/conversations/{conversation}")
    assert status == 200 and body["turns"] == []


def test_unknown_conversation_is_empty_history_not_an_error(mesh):
    status, body, _ = mesh.request("GET", "/api/conversations/never-seen")
    assert status == 200 and body["turns"] == []
    status, body, _ = enrich(mesh, {"message": "hola", "conversation_id": "never-seen"})
    assert status == 200 and not any(a["kind"] == "history" for a in body["added_context"])


async def test_concurrent_writes_to_one_conversation_lose_no_turn(mesh):
    conversation = "concurrent-1"
    async with edge_channel(mesh) as channel:
        stub = context_pb2_grpc.ContextServiceStub(channel)
        await asyncio.gather(
            *(
                stub.AppendTurn(
                    context_pb2.AppendTurnRequest(
                        conversation_id=conversation, role=inference_pb2.ROLE_USER, content=f"turn {i}"
                    ),
                    timeout=30,
                )
                for i in range(100)
            )
        )
        stored = await stub.GetConversation(
            context_pb2.GetConversationRequest(conversation_id=conversation), timeout=10
        )
    contents = [t.content for t in stored.turns]
    assert sorted(contents) == sorted(f"turn {i}" for i in range(100))  # each exactly once


async def test_history_is_trimmed_to_the_context_window_keeping_the_newest(mesh):
    conversation = "long-1"
    async with edge_channel(mesh) as channel:
        stub = context_pb2_grpc.ContextServiceStub(channel)
        for i in range(40):  # ~40 x 120 tokens: far more than phi's 2048-token window
            await stub.AppendTurn(
                context_pb2.AppendTurnRequest(
                    conversation_id=conversation,
                    role=inference_pb2.ROLE_USER if i % 2 == 0 else inference_pb2.ROLE_ASSISTANT,
                    content=f"turn {i}: " + "the quick brown fox jumps over the lazy dog " * 12,
                ),
                timeout=10,
            )
        result = await stub.Enrich(
            context_pb2.EnrichRequest(message="resume", conversation_id=conversation, model_id="phi"), timeout=60
        )
    (history,) = [a for a in result.added_context if a.kind == "history"]
    kept = int(history.content.split()[0])
    assert 5 < kept < 40 and "of 40 turns" in history.reason
    history_messages = list(result.messages)[1:-1]
    assert len(history_messages) == kept
    assert history_messages[-1].content.startswith("turn 39:")  # the newest turn is kept
    assert history_messages[0].content.startswith(f"turn {40 - kept}:")


def test_history_survives_a_restart_of_the_service(mesh, tmp_path):
    config = yaml.safe_load(mesh.config_path.read_text())
    config["state_dir"] = str(tmp_path / "state")
    for i, name in enumerate(config["services"]):
        config["services"][name].update(port=27150 + i, metrics_port=27170 + i)
    config["edge"] = {"port": 27101, "admin_port": 27191, "mesh_port": 27102, "listen_address": "127.0.0.1"}
    path = tmp_path / "capibara.yaml"
    path.write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{config['services']['context']['port']}"

    def serve():
        process = subprocess.Popen(
            [str(BIN / "capibara"), "--config", str(path), "serve", "context"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in process.stdout:
            if "serving context" in line:
                return process
        raise AssertionError("context service did not start")

    async def call(method, request):
        async with grpc.aio.insecure_channel(address) as channel:
            return await getattr(context_pb2_grpc.ContextServiceStub(channel), method)(request, timeout=10)

    first = serve()
    try:
        for text in ("primera", "segunda"):
            asyncio.run(
                call(
                    "AppendTurn",
                    context_pb2.AppendTurnRequest(
                        conversation_id="restart-1", role=inference_pb2.ROLE_USER, content=text
                    ),
                )
            )
    finally:
        first.terminate()
        first.wait(10)
    second = serve()
    try:
        stored = asyncio.run(call("GetConversation", context_pb2.GetConversationRequest(conversation_id="restart-1")))
        assert [t.content for t in stored.turns] == ["primera", "segunda"]
    finally:
        second.terminate()
        second.wait(10)
