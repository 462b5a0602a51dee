"""TOON over the edge: REST and gRPC, key order both ways byte for byte, every option of the spec,
bad options, decode errors naming the line. Uses the session mesh (tests/conftest.py)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import pytest

from capibara_grpc.stubs import context_pb2, context_pb2_grpc
from tests.support.channels import edge_channel


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
    assert list(encoded) == ["toon", "json_tokens", "toon_tokens", "savings", "tokens_estimated"]
    assert encoded["tokens_estimated"] is False  # llama-server counts them with the model's tokenizer
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
