"""The OpenAPI 3 document of the REST surface, generated from the protos' google.api.http
annotations and message descriptors (the same ones Envoy's transcoder uses), never by hand.

JSON follows the transcoder's settings: proto field names (snake_case), enums as names, 64-bit
integers as strings, google.protobuf.Value as any JSON. Server-streaming methods answer
text/event-stream (one `data: <JSON message>` per event); google.api.HttpBody answers raw bytes.
`capibara openapi` writes docs/openapi.json; a test checks that the committed file is current,
and Envoy serves it at GET /api/openapi.json.
"""

from __future__ import annotations

import json
import re

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from capibara_grpc.edge import descriptor

_SCALARS = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": "string", "format": "uint64"},
    FieldDescriptor.TYPE_SINT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    FieldDescriptor.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}
_WELL_KNOWN = {
    "google.protobuf.Value": {"description": "any JSON value"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?\d+(\.\d+)?s$"},
    "google.protobuf.Empty": {"type": "object"},
}
ERROR_SCHEMA = {
    "type": "object",
    "description": "google.rpc.Status: the gRPC code (e.g. 3 INVALID_ARGUMENT) and a message saying what is wrong",
    "properties": {
        "code": {"type": "integer"},
        "message": {"type": "string"},
        "details": {"type": "array", "items": {}},
    },
    "required": ["code", "message"],
}
# The OpenAI-compatible API (/v1/...) answers errors in OpenAI's shape (rewritten at the edge).
OPENAI_PREFIX = "/v1/"
OPENAI_ERROR_SCHEMA = {
    "type": "object",
    "description": "OpenAI's error shape; `param` names the offending request field, when there is one",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
            "required": ["message", "type"],
        }
    },
    "required": ["error"],
}
# Statuses any call may get from the edge or the services, with the matching gRPC codes.
ERROR_STATUSES = {
    "400": "bad input (INVALID_ARGUMENT), malformed JSON or an unknown field",
    "401": "missing or invalid API key (when keys are configured)",
    "404": "unknown model, voice, route or path (NOT_FOUND)",
    "413": "request body over 1 MiB",
    "429": "rate limited or the model's queue is full (RESOURCE_EXHAUSTED); see Retry-After",
    "503": "a backend or service is down (UNAVAILABLE)",
    "504": "deadline exceeded",
}


def _sse_event(data: str) -> dict:
    """One Server-Sent Event (what SSE-aware tools such as schemathesis check each event against):
    its `data` line holds `data`."""
    return {
        "type": "object",
        "description": f"one event per message: `data: <{data}>` and a blank line",
        "properties": {"data": {"type": "string", "description": data}},
    }


def _schema_name(message: Descriptor) -> str:
    return message.full_name


def _field_schema(field: FieldDescriptor, wanted: list[Descriptor]) -> dict:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value = field.message_type.fields_by_name["value"]
        return {"type": "object", "additionalProperties": _field_schema(value, wanted)}
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        name = field.message_type.full_name
        item = dict(_WELL_KNOWN[name]) if name in _WELL_KNOWN else {"$ref": f"#/components/schemas/{name}"}
        if name not in _WELL_KNOWN:
            wanted.append(field.message_type)
    elif field.type == FieldDescriptor.TYPE_ENUM:
        item = {"type": "string", "enum": [v.name for v in field.enum_type.values]}
    else:
        item = dict(_SCALARS[field.type])
    if field.is_repeated:
        return {"type": "array", "items": item}
    return item


def _message_schema(message: Descriptor, wanted: list[Descriptor], skip: set[str] = frozenset()) -> dict:
    properties = {f.name: _field_schema(f, wanted) for f in message.fields if f.name not in skip}
    return {"type": "object", "properties": properties}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


# Raw JSON bodies (google.api.HttpBody, read by the service so that key order survives the edge)
# described by the messages whose JSON shape they have: method -> (request, response, note).
RAW_JSON_SHAPES = {
    "/capibara.context.v1.ContextService/EncodeToonJson": (
        "capibara.context.v1.EncodeToonRequest",
        "capibara.context.v1.EncodeToonResponse",
        "Raw JSON body, object key order kept. `options` also takes the spec's names (indentSize, keyFolding, "
        "flattenDepth); unknown fields and bad option values are 400.",
    ),
    "/capibara.context.v1.ContextService/DecodeToonJson": (
        "capibara.context.v1.DecodeToonRequest",
        "capibara.context.v1.DecodeToonResponse",
        "Raw JSON body, or the TOON document itself as text/plain. The answer is {json} only (json_text is "
        "gRPC's), keys in document order. `options` also takes the spec's names (indentSize, expandPaths).",
    ),
}


def build() -> dict:
    paths: dict = {}
    schemas: dict = {}
    wanted: list[Descriptor] = []
    for rule in descriptor.http_rules():
        path_params = re.findall(r"\{(\w+)\}", rule["path"])
        method_name = rule["grpc_path"].rsplit("/", 1)[-1]
        operation = {
            "operationId": f"{rule['service'].rsplit('.', 1)[-1]}_{method_name}",
            "summary": f"{rule['service']}/{method_name}"
            + (" (server-streaming, as SSE)" if rule["server_streaming"] else ""),
            "tags": [rule["service"]],
            "parameters": [
                {"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in path_params
            ],
        }
        request, output = rule["input"], rule["output"]
        if rule["grpc_path"] in RAW_JSON_SHAPES:
            *names, operation["description"] = RAW_JSON_SHAPES[rule["grpc_path"]]
            request, output = (rule["input"].file.pool.FindMessageTypeByName(n) for n in names)
        if rule["body"] == "*" and request.full_name == "google.api.HttpBody":
            # Passed on raw (the OpenAI-compatible API): OpenAI's own JSON, checked by the service.
            operation["requestBody"] = {"required": True, "content": _json({"type": "object"})}
        elif rule["body"] == "*":
            schemas[_schema_name(request)] = _message_schema(request, wanted, set(path_params))
            operation["requestBody"] = {
                "required": True,
                "content": _json({"$ref": f"#/components/schemas/{request.full_name}"}),
            }
        else:
            for field in request.fields:
                if field.name not in path_params and field.type != FieldDescriptor.TYPE_MESSAGE:
                    operation["parameters"].append(
                        {"name": field.name, "in": "query", "required": False, "schema": _field_schema(field, wanted)}
                    )
        if output.full_name == "google.api.HttpBody" and rule["server_streaming"]:
            content = {
                "application/json": {"schema": {"type": "object"}},
                "text/event-stream": {"schema": _sse_event("an OpenAI chat.completion.chunk, or [DONE] last")},
            }
        elif output.full_name == "google.api.HttpBody" and rule["path"].startswith(OPENAI_PREFIX):
            content = _json({"type": "object"})
        elif output.full_name == "google.api.HttpBody":
            content = {"*/*": {"schema": {"type": "string", "format": "binary"}}}
        else:
            wanted.append(output)
            reference = {"$ref": f"#/components/schemas/{output.full_name}"}
            content = (
                {"text/event-stream": {"schema": _sse_event(f"JSON {output.full_name}")}}
                if rule["server_streaming"]
                else _json(reference)
            )
        operation["responses"] = {"200": {"description": "OK", "content": content}}
        error = "OpenAIError" if rule["path"].startswith(OPENAI_PREFIX) else "Error"
        operation["responses"].update(
            {
                code: {"description": text, "content": _json({"$ref": f"#/components/schemas/{error}"})}
                for code, text in ERROR_STATUSES.items()
            }
        )
        paths.setdefault(rule["path"], {})[rule["verb"].lower()] = operation
    while wanted:
        message = wanted.pop()
        if message.full_name not in schemas:
            schemas[message.full_name] = _message_schema(message, wanted)
    schemas["Error"] = ERROR_SCHEMA
    schemas["OpenAIError"] = OPENAI_ERROR_SCHEMA
    paths["/api/openapi.json"] = {
        "get": {
            "operationId": "OpenApi",
            "summary": "this document",
            "tags": ["meta"],
            "responses": {"200": {"description": "OK", "content": _json({"type": "object"})}},
        }
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Capibara mesh REST API",
            "description": "Generated from the protos' google.api.http annotations (capibara openapi); "
            "do not edit. Every path is also a gRPC method on the same port.",
            "version": "v1",
        },
        "servers": [{"url": "https://localhost:5001"}],
        "security": [{}, {"bearer": []}, {"apiKey": []}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "an API key, when keys are configured"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False, ensure_ascii=False) + "\n"
