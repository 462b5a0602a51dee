"""A mock OpenAI-compatible model server for benchmarks/peers.py: cheap enough never to be the
bottleneck, so that a gateway in front of it is what a benchmark measures.

    .venv/bin/python benchmarks/openai_mock.py PORT [--tokens 8]

Serves POST /v1/chat/completions (plain and streaming), GET /v1/models and GET /health over
HTTP/1.1 with keep-alive, on a bare asyncio.Protocol (no framework): each answer is built once per
distinct (model, stream, usage, prompt size) and then written as prepared bytes, no delay.

The answer's length in tokens: the number the model name ends with (`mock-256` answers 256
tokens), else --tokens; a request's max_tokens (or max_completion_tokens) below that cuts the
answer with finish_reason "length", as OpenAI's API does.

The wire format is OpenAI's own, copied from the OpenAI API reference ("The chat completion
object", "The chat completion chunk object", "Streaming": https://platform.openai.com/docs/api-reference/chat)
and checked against openai-python's types (openai.types.chat.ChatCompletion and
ChatCompletionChunk; tests/unit/test_bench_mock.py parses it with the SDK): a `chat.completion`
object, or `text/event-stream` with one `data: {chat.completion.chunk}` event per token (the first
carrying the role, the last an empty delta with the finish_reason), then, with
stream_options.include_usage, a chunk with no choices and the usage (every other chunk has
"usage": null), then `data: [DONE]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time

WORDS = "Capybaras are the largest living rodents and they swim well in warm rivers".split()
CREATED = int(time.time())
FINGERPRINT = "fp_mock0000000"
SERVER = b"server: openai-mock\r\n"


def answer_tokens(model: str, body: dict, default: int) -> tuple[int, str]:
    """(tokens, finish_reason) for a request: the model name's number or `default`, cut by max_tokens."""
    found = re.search(r"(\d+)$", model)
    tokens = int(found.group(1)) if found else default
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and 0 < limit < tokens:
        return limit, "length"
    return tokens, "stop"


def token_text(i: int) -> str:
    return ("" if i == 0 else " ") + WORDS[i % len(WORDS)]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def http_response(status: str, content_type: str, body: bytes, keep_alive: bool) -> bytes:
    head = f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
    head += "" if keep_alive else "connection: close\r\n"
    return head.encode() + SERVER + b"\r\n" + body


def completion(model: str, tokens: int, finish: str, prompt_tokens: int) -> bytes:
    text = "".join(token_text(i) for i in range(tokens))
    return json.dumps(
        {
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": usage(prompt_tokens, tokens),
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
        },
        separators=(",", ":"),
    ).encode()


def stream_events(model: str, tokens: int, finish: str, prompt_tokens: int, include_usage: bool) -> list[bytes]:
    """The SSE events of a streamed answer, each `data: ...\\n\\n`."""

    def chunk(delta: dict, finish_reason, choices: bool = True, usage_value=None) -> bytes:
        event = {
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
            "choices": (
                [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}] if choices else []
            ),
        }
        if include_usage:
            event["usage"] = usage_value
        return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"

    events = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
    events += [chunk({"content": token_text(i)}, None) for i in range(tokens)]
    events.append(chunk({}, finish))
    if include_usage:
        events.append(chunk({}, None, choices=False, usage_value=usage(prompt_tokens, tokens)))
    events.append(b"data: [DONE]\n\n")
    return events


def streamed_response(events: list[bytes], keep_alive: bool) -> bytes:
    """Chunked transfer encoding, one HTTP chunk per event, as OpenAI's API sends them."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n"
    head += b"" if keep_alive else b"connection: close\r\n"
    parts = [head + SERVER + b"\r\n"]
    parts += [b"%x\r\n%s\r\n" % (len(event), event) for event in events]
    parts.append(b"0\r\n\r\n")
    return b"".join(parts)


def error_body(message: str, kind: str, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


class MockServer:
    def __init__(self, default_tokens: int):
        self.default_tokens = default_tokens
        self.prepared: dict[tuple, bytes] = {}

    def respond(self, method: str, path: str, body: bytes, keep_alive: bool) -> bytes:
        path = path.split("?", 1)[0]
        if path == "/health" and method == "GET":
            return http_response("200 OK", "application/json", b'{"status":"ok"}', keep_alive)
        if path in ("/v1/models", "/models") and method == "GET":
            models = {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": CREATED, "owned_by": "mock"} for m in ("mock-8", "mock-256")
                ],
            }
            return http_response("200 OK", "application/json", json.dumps(models).encode(), keep_alive)
        if path not in ("/v1/chat/completions", "/chat/completions") or method != "POST":
            return http_response(
                "404 Not Found",
                "application/json",
                error_body(f"no {method} {path}", "invalid_request_error"),
                keep_alive,
            )
        try:
            request = json.loads(body)
            model = str(request["model"])
        except (ValueError, KeyError, TypeError):
            return http_response(
                "400 Bad Request",
                "application/json",
                error_body("a JSON body with a model", "invalid_request_error"),
                keep_alive,
            )
        stream = bool(request.get("stream"))
        include_usage = stream and bool((request.get("stream_options") or {}).get("include_usage"))
        tokens, finish = answer_tokens(model, request, self.default_tokens)
        prompt_tokens = max(1, len(body) // 16)  # an estimate: a benchmark's prompt size barely varies
        key = (model, stream, include_usage, tokens, finish, prompt_tokens, keep_alive)
        response = self.prepared.get(key)
        if response is None:
            if stream:
                response = streamed_response(
                    stream_events(model, tokens, finish, prompt_tokens, include_usage), keep_alive
                )
            else:
                response = http_response(
                    "200 OK", "application/json", completion(model, tokens, finish, prompt_tokens), keep_alive
                )
            if len(self.prepared) < 10_000:
                self.prepared[key] = response
        return response


class Connection(asyncio.Protocol):
    def __init__(self, server: MockServer):
        self.server = server
        self.buffer = b""
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes):
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self.transport.write(
                    http_response(
                        "411 Length Required",
                        "application/json",
                        error_body("send content-length", "invalid_request_error"),
                        False,
                    )
                )
                self.transport.close()
                return
            length = int(headers.get("content-length", "0") or 0)
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            method, path, version = (head[0].split(" ") + ["", ""])[:3]
            connection = headers.get("connection", "").lower()
            keep_alive = connection != "close" and (version == "HTTP/1.1" or connection == "keep-alive")
            self.transport.write(self.server.respond(method, path, body, keep_alive))
            if not keep_alive:
                self.transport.close()
                return


async def serve(port: int, tokens: int, host: str = "127.0.0.1") -> None:
    server = MockServer(tokens)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: Connection(server), host, port, backlog=1024, reuse_address=True)
    print(f"mock serving on {host}:{port}", flush=True)
    async with listener:
        await listener.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--tokens", type=int, default=8, help="answer length for a model name without a number")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.port, args.tokens, args.host))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
