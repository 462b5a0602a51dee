"""Fake model servers that speak each real server's wire format, over a real loopback socket.

The answer is ``"echo: " + <last user message>`` (so a test sees what the model saw), one chunk per word. Each
flavor copies its shapes from that server's own source, as read for this file:

* ``openai``: the hosted API behind a key, strict. Request fields: openai-python
  ``src/openai/types/chat/completion_create_params.py`` (CompletionCreateParamsBase) and the
  ``chat_completion_*_message_param.py`` types; chunks: ``chat_completion_chunk.py`` and
  ``chat_completion_stream_options_param.py`` (include_usage: every chunk has ``"usage": null``, then one chunk
  with ``"choices": []``; ``obfuscation`` padding is on by default); in-band stream errors as
  ``src/openai/_streaming.py`` reads them. Error texts as the API sends them
  (https://platform.openai.com/docs/guides/error-codes, and public issues quoting them). The hosted API streams
  no reasoning text: only ``usage.completion_tokens_details.reasoning_tokens``.
* ``vllm``: ``vllm serve``. vllm/entrypoints/openai/chat_completion/{protocol,serving}.py and
  vllm/entrypoints/generate/base/protocol.py (``DeltaMessage.reasoning``: ``reasoning_content`` was renamed in
  vllm PR 27752 and removed in PR 33402); vllm/entrypoints/openai/engine/protocol.py (``OpenAIBaseModel`` is
  ``extra="allow"``: unknown fields are logged and ignored; ``ErrorInfo.code`` is the HTTP status);
  vllm/entrypoints/openai/engine/serving.py (``_check_model``, ``_validate_input``); vllm/entrypoints/serve/
  tokenize/protocol.py, instrumentator/health.py, middleware/authenticate.py (every route but the public ones).
* ``ollama``: Ollama's ``/v1`` layer. ollama/ollama openai/openai.go (types, ``NewError``, ``ToStreamChunks``,
  ``FinishChunk``), middleware/openai.go (``ChatWriter``), server/routes.go (routes, ``streamResponse``). Go's
  JSON decoding ignores unknown fields, and ``max_completion_tokens`` is not one of its fields. Ollama has no API
  keys: with ``api_key`` set the fake answers as a proxy in front of it would, in Ollama's error shape.
* ``llama_server``: llama.cpp's ``llama-server``. ggml-org/llama.cpp tools/server/server-context.cpp
  (``get_health``, ``get_props``, ``get_models``, ``post_tokenize``, ``handle_completions_impl``),
  server-task.cpp (``to_json_oaicompat_chat[_stream]``, ``usage_json_oaicompat``, ``result_timings``),
  server-common.cpp (``format_error_response``), server-http.cpp (API-key middleware, 404). Unknown fields and
  the ``model`` name are ignored (it serves one model).

Versions read: openai-python e43b422 and ollama fb30760 (2026-08-21 snapshots); vLLM and llama.cpp: recent main.

Tools: a request with ``tools`` (and ``tool_choice`` not ``"none"``) whose last message is the user's gets
``tool_calls`` calls (default 1; 2 = two in parallel, unless ``parallel_tool_calls`` is false) instead of text: call
i is the named tool (``tool_choice`` naming a function) or the i-th declared tool, with ``tool_arguments`` (default
``{"city": "Paris"}``). After a ``tool`` message the answer is ``"tool said: " + <its content>``, so a test sees the
result was used. Each flavor streams calls as its server does:

* ``openai``: openai-python ``chat_completion_chunk.py`` (ChoiceDeltaToolCall: index, id, type, function.name,
  function.arguments) and the API's streams as its docs show them (https://platform.openai.com/docs/guides/
  function-calling, "Streaming"): a first delta ``{index, id: "call_...", type: "function", function: {name,
  arguments: ""}}`` (with ``role``, ``content: null``, ``refusal: null`` on the first call), then deltas
  ``{index, function: {arguments: <fragment>}}``; ``finish_reason: "tool_calls"`` on an empty delta.
* ``vllm``: vllm/entrypoints/openai/chat_completion/serving.py and the tool parsers (e.g. hermes_tool_parser.py):
  ``DeltaToolCall(index, id="chatcmpl-tool-<hex>", type="function", function={name})`` (no arguments key,
  ``exclude_none``), then ``{index, function: {arguments}}`` fragments; finish reason ``tool_calls``.
* ``ollama``: openai/openai.go ``ToToolCalls`` / ``ToChunk``: each call whole in one delta (``id: "call_" + 8
  chars``, ``index``, ``type``, ``function.arguments`` = Go's ``json.Marshal`` of the map: keys sorted,
  compact); the last chunk's finish reason is ``tool_calls`` once a call was sent.
* ``llama_server``: common/chat.cpp ``common_chat_msg_diff::compute_diffs`` and
  ``common_chat_msg_diff_to_json_oaicompat``: a new call's delta carries ``index, id`` (32 random chars),
  ``type``, ``function: {name, arguments: <what is parsed so far>}`` (may already hold a fragment), then
  ``{index, function: {arguments: <fragment>}}``; one chunk per diff; finish reason ``tool_calls``.

Token counts are word counts, an estimate (the fake has no tokenizer); ``/tokenize`` ids are a hash per word.
Reasoning words count as completion tokens (as every server counts them) but not against ``max_tokens``.

Stream faults count token chunks (reasoning or answer words; not the opening role chunk). A broken stream ends as
each server ends one: OpenAI and llama-server send ``data: {"error": {...}}`` and stop (no ``[DONE]``); vLLM sends
its error event and then ``[DONE]``; Ollama's /v1 layer decodes the runner's ``{"error": ...}`` line as an empty
response, so the client sees one chunk with ``content: ""`` and ``model: ""``, then the end (no error, no [DONE]).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import inspect
import json
import os
import random
import re
import socket
import ssl
import string
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web

FLAVORS = ("openai", "vllm", "ollama", "llama_server")
REASONING_FIELD = {"openai": None, "vllm": "reasoning", "ollama": "reasoning", "llama_server": "reasoning_content"}
# openai-python CompletionCreateParamsBase, and the keys of its six message param types
OPENAI_FIELDS = frozenset(
    "messages model audio frequency_penalty function_call functions logit_bias logprobs max_completion_tokens"
    " max_tokens metadata modalities moderation n parallel_tool_calls prediction presence_penalty prompt_cache_key"
    " prompt_cache_options prompt_cache_retention reasoning_effort response_format safety_identifier seed"
    " service_tier stop store stream stream_options temperature tool_choice tools top_logprobs top_p user"
    " verbosity web_search_options".split()
)
OPENAI_MESSAGE_KEYS = frozenset("role content name audio function_call refusal tool_calls tool_call_id".split())
OPENAI_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth"
    " (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) if you're accessing the"
    " API from your browser and are prompted for a username. You can obtain an API key from"
    " https://platform.openai.com/account/api-keys."
)
OPENAI_FINGERPRINT, LLAMA_BUILD = "fp_fake0001", "b6500-fake0000"
VLLM_PUBLIC = ("/health", "/ping", "/load", "/version", "/metrics", "/docs", "/redoc", "/openapi.json")
VLLM_GUARDED = ("/v1", "/v2", "/tokenize", "/detokenize", "/inference")  # MIN_GUARDED_PREFIXES, and its routes
LLAMA_PUBLIC = ("/health", "/v1/health", "/models", "/v1/models", "/")  # server-http.cpp get_public_endpoints
LLAMA_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error"}
LLAMA_ERROR_TYPES |= {404: "not_found_error", 501: "not_supported_error", 503: "unavailable_error"}
FAILURE_TEXT = {  # fail_next()'s default messages, where the server has its own wording
    ("openai", 500): "The server had an error while processing your request. Sorry about that!",
    ("openai", 503): "The engine is currently overloaded, please try again later",
    ("vllm", 500): "Internal server error",
    ("ollama", 503): "server busy, please try again.  maximum pending requests exceeded",
    ("llama_server", 503): "Loading model",
}
SECRET_HEADERS = ("authorization", "x-api-key")


@dataclass(repr=False)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: dict | None  # parsed JSON

    def __repr__(self) -> str:  # keys stay out of test output
        shown = {k: "***" if k in SECRET_HEADERS else v for k, v in self.headers.items()}
        return f"Recorded({self.method} {self.path}, headers={shown}, body={self.body!r})"


def _pieces(text: str) -> list[str]:
    """Words with their leading whitespace: joined again, they give the text back."""
    return re.findall(r"\s*\S+", text)


def _text(content: Any) -> str:
    if isinstance(content, list):  # content parts: the text ones
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content if isinstance(content, str) else ""


def _words(messages: list[dict]) -> int:
    return sum(len(_text(m.get("content")).split()) for m in messages)


def _token_id(word: str) -> int:
    return 2 + zlib.crc32(word.encode()) % 31998  # a stand-in tokenizer; 1 is BOS


def _redact(key: str) -> str:
    """A wrong key as OpenAI echoes it: head and tail, the middle starred."""
    return key[:8] + "*" * (len(key) - 12) + key[-4:] if len(key) >= 20 else key[:5] + "***" + key[-2:]


def _fragments(text: str, size: int = 5) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _tool_name(tool: Any) -> str | None:
    if isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict):
        return tool["function"].get("name")
    return None


def _dump(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


@contextlib.contextmanager
def serving(servers: dict[str, FakeUpstream]) -> Iterator[dict[str, FakeUpstream]]:
    """Several fake servers started together (a module fixture's `upstreams`), all stopped at the end."""
    with contextlib.ExitStack() as stack:
        for server in servers.values():
            stack.enter_context(server)
        yield servers


class FakeUpstream:
    """One fake server (see the module docstring); start() returns self, and it is a context manager.

    api_key: None for no auth, else the key every guarded endpoint wants. models: the served names.
    reasoning: streamed word by word before the answer, under reasoning_field (default: the flavor's own).
    max_model_len: vLLM's max_model_len, llama-server's n_ctx. required_headers: checked on every request (400).
    """

    def __init__(
        self,
        flavor: str = "openai",
        api_key: str | None = None,
        models: list[str] | None = None,
        reasoning: str = "",
        reasoning_field: str | None = None,
        max_model_len: int = 4096,
        token_delay_s: float = 0.0,
        required_headers: dict[str, str] | None = None,
        port: int = 0,
        tls: tuple[str, str] | None = None,
        tool_calls: int = 1,
        tool_arguments: dict | None = None,
        tools_after_results: bool = False,
    ):
        """`tls`: (certificate, key) PEM files to serve https with (a CA file for the client).
        `tool_calls`: how many calls answer a request with tools (0: answer text); `tool_arguments`: their
        arguments (see the module docstring); `tools_after_results`: call tools again after tool results
        (a model that never stops calling them; tool_choice "none" still stops it)."""
        if flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {FLAVORS}")
        self.flavor, self._key, self.models = flavor, api_key, list(models or ["gpt-test"])
        self.reasoning, self.reasoning_field = reasoning, reasoning_field or REASONING_FIELD[flavor]
        self.max_model_len, self.token_delay_s, self.port = max_model_len, token_delay_s, port
        self.required_headers = dict(required_headers or {})
        self._tls = tls
        self.tool_calls, self.tool_arguments = tool_calls, dict(tool_arguments or {"city": "Paris"})
        self.tools_after_results = tools_after_results
        self._lock = threading.Lock()
        self._requests: list[Recorded] = []
        self._failures: list[tuple[int, dict[str, str], Any]] = []
        self._stream_faults: dict[str, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._created = int(time.time())

    def __repr__(self) -> str:
        return f"FakeUpstream({self.flavor}, {self.root_url}, models={self.models})"

    # --- lifecycle: an aiohttp server on its own event loop, in a background thread ---
    def start(self) -> FakeUpstream:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"fake-{self.flavor}", daemon=True)
        self._thread.start()
        self._call(self._open())
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._call(self._shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()
            self._loop = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def refuse(self) -> None:
        """Close the listening socket (connections refused) until accept(); open connections go on."""
        self._call(self._site.stop())

    def accept(self) -> None:
        self._call(self._listen())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _shutdown(self) -> None:
        """Stop listening, then end the handlers still running (a stalled or delayed stream)."""
        await self._runner.cleanup()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _open(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        ssl_context = None
        if self._tls:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(*self._tls)
        self._site = web.SockSite(self._runner, sock, ssl_context=ssl_context)
        await self._site.start()

    @property
    def root_url(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root_url + "/v1"

    # --- what tests read and arrange ---
    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    def chat_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/chat/completions")]

    def fail_next(self, status: int = 429, headers: dict[str, str] | None = None, count: int = 1, body: Any = None):
        """The next `count` chat requests get `status` with the flavor's error body (or `body`)."""
        with self._lock:
            self._failures += [(status, dict(headers or {}), body)] * count

    def break_stream_after(self, n: int) -> None:
        """The next stream sends n token chunks, then the flavor's in-band error, then ends."""
        self._fault(break_after=n)

    def cut_stream_after(self, n: int) -> None:
        """The next stream sends n token chunks, then the connection is closed mid-body."""
        self._fault(cut_after=n)

    def delay_first_chunk(self, seconds: float) -> None:
        self._fault(first_delay=seconds)

    def stall_after(self, n: int, seconds: float) -> None:
        self._fault(stall=(n, seconds))

    def _fault(self, **fault: Any) -> None:
        with self._lock:
            self._stream_faults.update(fault)

    # --- HTTP ---
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        record = Recorded(request.method, request.path, {k.lower(): v for k, v in request.headers.items()}, None)
        record.body = body if isinstance(body, dict) else None
        with self._lock:
            self._requests.append(record)
        given = self._presented_key(request)
        if given is not None and not (given and hmac.compare_digest(given.encode(), self._key.encode())):
            return self._unauthorized(given)
        route = self._routes().get((request.method, request.path))
        if route is None:
            return self._not_found(request)
        for name, value in self.required_headers.items():
            if request.headers.get(name) != value:
                return self._error(400, f"missing or wrong header: {name}")
        response = route(request, body)
        return await response if inspect.isawaitable(response) else response

    def _routes(self) -> dict[tuple[str, str], Any]:
        routes = {("GET", "/v1/models"): self._list_models, ("POST", "/v1/chat/completions"): self._chat}
        if self.flavor == "vllm":
            routes[("GET", "/health")] = lambda r, b: web.Response()  # 200, empty body
            routes[("POST", "/tokenize")] = self._vllm_tokenize
        elif self.flavor == "ollama":
            routes[("GET", "/")] = routes[("HEAD", "/")] = lambda r, b: web.Response(text="Ollama is running")
        elif self.flavor == "llama_server":
            for path in ("/health", "/v1/health"):
                routes[("GET", path)] = lambda r, b: self._json({"status": "ok"})
            routes[("GET", "/props")] = self._llama_props
            routes[("POST", "/tokenize")] = self._llama_tokenize
            routes[("GET", "/models")] = self._list_models
            routes[("POST", "/chat/completions")] = self._chat
        return routes

    def _presented_key(self, request: web.Request) -> str | None:
        """The key the request presents ("" if none), or None where the flavor checks no key."""
        path, auth = request.path, request.headers.get("Authorization", "")
        if self._key is None or request.method == "OPTIONS":
            return None
        if self.flavor == "vllm":  # authenticate.py (older vLLM guarded /v1 only)
            if any(path == p or path.startswith(p + "/") for p in VLLM_PUBLIC) or not path.startswith(VLLM_GUARDED):
                return None
            scheme, _, given = auth.partition(" ")
            return given if scheme.lower() == "bearer" else ""
        if self.flavor == "llama_server":  # "Bearer " optional, X-Api-Key too
            return (
                None if path in LLAMA_PUBLIC else (auth or request.headers.get("X-Api-Key", "")).removeprefix("Bearer ")
            )
        return auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else ""

    def _unauthorized(self, given: str) -> web.Response:
        if self.flavor == "vllm":
            return self._json({"error": "Unauthorized"}, 401)
        if self.flavor == "llama_server":
            return self._error(401, "Invalid API Key")
        if self.flavor == "ollama":
            return self._error(401, "unauthorized")
        if not given:
            return self._error(401, OPENAI_NO_KEY)
        message = f"Incorrect API key provided: {_redact(given)}. You can find your API key at https://platform.openai.com/account/api-keys."
        return self._error(401, message, code="invalid_api_key")

    def _headers(self) -> dict[str, str]:
        if self.flavor == "llama_server":
            return {"Server": "llama.cpp"}
        return {"x-request-id": uuid.uuid4().hex} if self.flavor == "openai" else {}

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        if self.flavor == "openai":  # the hosted API pretty-prints its bodies
            text, ctype = json.dumps(obj, indent=2, ensure_ascii=False) + "\n", "application/json"
        else:  # Go's json.Encoder ends with a newline
            text, ctype = _dump(obj) + "\n" * (self.flavor == "ollama"), "application/json"
            ctype += "; charset=utf-8" * (self.flavor == "llama_server")
        headers = {"Content-Type": ctype, **self._headers(), **(headers or {})}
        return web.Response(body=text.encode(), status=status, headers=headers)  # bytes: no charset added

    def _error(self, status: int, message: str, headers=None, param=None, code=None, **extra: Any) -> web.Response:
        """`message` in the flavor's error shape; `extra` joins llama-server's error object."""
        if self.flavor == "openai":
            kind = "requests" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
            code = code or ("rate_limit_exceeded" if status == 429 else None)
            error = {"message": message, "type": kind, "param": param, "code": code}
        elif self.flavor == "vllm":  # create_error_response; http_exception_handler's phrases otherwise
            kind = extra.get("type") or {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}.get(
                status
            )
            error = {"message": message, "type": kind or HTTPStatus(status).phrase, "param": param, "code": status}
        elif self.flavor == "ollama":  # openai.go NewError
            kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
            error = {"message": message, "type": kind, "param": None, "code": None}
        else:  # format_error_response, which has no type for 429
            error = {"code": status, "message": message, "type": LLAMA_ERROR_TYPES.get(status, "server_error")} | extra
        return self._json({"error": error}, status, headers)

    def _not_found(self, request: web.Request) -> web.Response:
        if self.flavor == "openai":
            return self._error(404, f"Invalid URL ({request.method} {request.path})")
        if self.flavor == "ollama":  # gin's default 404
            return web.Response(text="404 page not found", status=404)
        if self.flavor == "vllm":  # FastAPI's 404 through http_exception_handler
            return self._error(404, "Not Found", type="Not Found")
        return self._error(404, "File Not Found")

    # --- endpoints other than chat ---
    def _list_models(self, request: web.Request, body: Any) -> web.Response:
        card = {"object": "model", "created": self._created}
        if self.flavor == "openai":
            data = [{"id": m, **card, "owned_by": "openai"} for m in self.models]
        elif self.flavor == "vllm":  # ModelCard, ModelPermission defaults
            perm = {"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": self._created}
            perm |= {"allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True}
            perm |= {"allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False}
            perm |= {"organization": "*", "group": None, "is_blocking": False}
            card |= {"owned_by": "vllm", "parent": None, "max_model_len": self.max_model_len, "permission": [perm]}
            data = [{"id": m, **card, "root": m} for m in self.models]
        elif self.flavor == "ollama":  # ToListCompletion: names carry a tag; owned_by is the namespace
            data = [{"id": m if ":" in m else m + ":latest", **card, "owned_by": "library"} for m in self.models]
        else:
            meta = {"vocab_type": 2, "n_vocab": 32000, "n_ctx_train": self.max_model_len, "n_embd": 576}
            data = [{"id": m, **card, "owned_by": "llamacpp", "meta": meta} for m in self.models]
            listing = [{"name": m, "model": m, "type": "model", "capabilities": ["completion"]} for m in self.models]
            return self._json({"models": listing, "object": "list", "data": data})
        return self._json({"object": "list", "data": data})

    def _vllm_tokenize(self, request: web.Request, body: Any) -> web.Response:
        body = body if isinstance(body, dict) else {}
        if body.get("model") and body["model"] not in self.models:
            return self._error(404, f"The model `{body['model']}` does not exist.", param="model")
        chat = "messages" in body  # TokenizeChatRequest: add_special_tokens defaults to False
        text = " ".join(_text(m.get("content")) for m in body["messages"]) if chat else str(body.get("prompt", ""))
        tokens = [1] * body.get("add_special_tokens", not chat) + [_token_id(w) for w in text.split()]
        return self._json(
            {"count": len(tokens), "max_model_len": self.max_model_len, "tokens": tokens} | {"token_strs": None}
        )

    def _llama_tokenize(self, request: web.Request, body: Any) -> web.Response:
        body = body if isinstance(body, dict) else {}  # add_special defaults to false
        words = ["<s>"] * bool(body.get("add_special")) + str(body.get("content", "")).split()
        tokens = [1 if w == "<s>" else _token_id(w) for w in words]
        if body.get("with_pieces"):
            return self._json({"tokens": [{"id": t, "piece": w} for t, w in zip(tokens, words, strict=True)]})
        return self._json({"tokens": tokens})

    def _llama_props(self, request: web.Request, body: Any) -> web.Response:
        params = {"n_predict": -1, "temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "stream": True}
        props = {"default_generation_settings": {"params": params, "n_ctx": self.max_model_len}, "total_slots": 1}
        props |= {"model_alias": self.models[0], "model_path": f"/models/{self.models[0]}.gguf"}
        props |= {"modalities": {"vision": False, "audio": False}, "endpoint_slots": True, "endpoint_props": False}
        props |= {"endpoint_metrics": False, "webui": False, "chat_template": "", "bos_token": "<s>"}
        return self._json(props | {"eos_token": "</s>", "build_info": LLAMA_BUILD})

    # --- chat ---
    async def _chat(self, request: web.Request, body: Any) -> web.StreamResponse:
        with self._lock:
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            return self._failure(*failure)
        if not isinstance(body, dict):
            return self._error(400, "We could not parse the JSON body of your request.")
        if (refusal := self._refuse(body)) is not None:
            return refusal
        last_user = next((m for m in reversed(body["messages"]) if m.get("role") == "user"), {})
        answer = "echo: " + _text(last_user.get("content"))
        if body["messages"][-1].get("role") == "tool":  # the results of the calls: the answer quotes them
            trailing = []
            for message in reversed(body["messages"]):
                if message.get("role") != "tool":
                    break
                trailing.insert(0, _text(message.get("content")))
            answer = "tool said: " + " ".join(trailing)
        if calls := self._plan_tool_calls(body):
            gen = _Generation(self, body, [], "tool_calls", calls)
            if body.get("stream"):
                return await self._stream(request, gen, bool((body.get("stream_options") or {}).get("include_usage")))
            return self._json(gen.completion())
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") in ("json_schema", "json_object"):
            answer = json.dumps({"answer": answer})  # valid JSON, not checked against the schema
        pieces, limit = _pieces(answer), self._max_tokens(body)
        finish = "length" if isinstance(limit, int) and 0 < limit < len(pieces) else "stop"
        gen = _Generation(self, body, pieces[:limit] if finish == "length" else pieces, finish)
        if body.get("stream"):
            return await self._stream(request, gen, bool((body.get("stream_options") or {}).get("include_usage")))
        return self._json(gen.completion())

    def _plan_tool_calls(self, body: dict) -> list[tuple[str, str]]:
        """(name, arguments JSON text) of each call to answer with; [] to answer text."""
        names = [n for n in map(_tool_name, body.get("tools") or []) if n]
        choice = body.get("tool_choice", "auto")
        callers = ("user", "tool") if self.tools_after_results else ("user",)
        if not names or choice == "none" or self.tool_calls <= 0 or body["messages"][-1].get("role") not in callers:
            return []
        if isinstance(choice, dict):  # {"type": "function", "function": {"name": ...}}
            names = [(choice.get("function") or {}).get("name") or names[0]]
        n = 1 if body.get("parallel_tool_calls") is False else self.tool_calls
        if self.flavor == "ollama":  # Go's json.Marshal of a map: keys sorted, compact
            arguments = json.dumps(self.tool_arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        elif self.flavor == "vllm":  # as the model wrote it (Hermes-style models put spaces after separators)
            arguments = json.dumps(self.tool_arguments, ensure_ascii=False)
        else:
            arguments = _dump(self.tool_arguments)
        return [(names[i % len(names)], arguments) for i in range(n)]

    def _max_tokens(self, body: dict) -> Any:
        if self.flavor == "ollama":  # openai.go ChatCompletionRequest: no max_completion_tokens
            return body.get("max_tokens")
        return body.get("max_completion_tokens") or body.get("max_tokens")

    def _failure(self, status: int, headers: dict[str, str], body: Any) -> web.Response:
        if body is not None:
            return self._json(body, status, headers)
        message = FAILURE_TEXT.get((self.flavor, status), HTTPStatus(status).phrase)
        if status == 429:
            wait = headers.get("Retry-After")
            message = "Rate limit reached for requests." + (f" Please try again in {wait}s." if wait else "")
        return self._error(status, message, headers)

    def _refuse(self, body: dict) -> web.Response | None:
        """The flavor's answer to a request that it would not run; None if it runs it."""
        messages, model = body.get("messages"), body.get("model")
        if self.flavor == "openai":
            if unknown := sorted(set(body) - OPENAI_FIELDS):
                return self._error(400, f"Unrecognized request argument supplied: {unknown[0]}")
            for i, message in enumerate(messages if isinstance(messages, list) else []):
                if isinstance(message, dict) and (extra := sorted(set(message) - OPENAI_MESSAGE_KEYS)):
                    return self._error(
                        400, f"Additional properties are not allowed ('{extra[0]}' was unexpected) - 'messages.{i}'"
                    )
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return self._error(400, "[] is too short - 'messages'", param="messages")
        if self.flavor == "openai" and model not in self.models:
            if not model:
                return self._error(400, "you must provide a model parameter")
            message = f"The model `{model}` does not exist or you do not have access to it."
            return self._error(404, message, code="model_not_found")
        if self.flavor == "vllm" and model and model not in self.models:  # no model: the served one
            return self._error(404, f"The model `{model}` does not exist.", param="model")
        untagged = [m.removesuffix(":latest") for m in self.models]  # Ollama adds the tag
        if self.flavor == "ollama" and str(model).removesuffix(":latest") not in untagged:
            return self._error(404, f"model '{model}' not found") if model else self._error(400, "model is required")
        n, cap, limit = _words(messages), self.max_model_len, self._max_tokens(body)
        if self.flavor == "vllm" and n >= cap:  # serving.py _validate_input
            message = f"This model's maximum context length is {cap} tokens. However, your request has {n} input tokens. Please reduce the length of the input messages."
            return self._error(400, message, param="input_tokens")
        if self.flavor == "vllm" and isinstance(limit, int) and n + limit > cap:
            message = f"'max_tokens' or 'max_completion_tokens' is too large: {limit}. This model's maximum context length is {cap} tokens and your request has {n} input tokens ({limit} > {cap} - {n})."
            return self._error(400, message, param="max_tokens")
        if self.flavor == "llama_server" and n > cap:
            message = f"request ({n} tokens) exceeds the available context size ({cap} tokens), try increasing it"
            return self._error(400, message, type="exceed_context_size_error", n_prompt_tokens=n, n_ctx=cap)
        return None

    async def _stream(self, request: web.Request, gen: _Generation, include_usage: bool) -> web.StreamResponse:
        with self._lock:
            faults, self._stream_faults = self._stream_faults, {}
        ctype = "text/event-stream" + "; charset=utf-8" * (self.flavor in ("openai", "vllm"))
        response = web.StreamResponse(headers={"Content-Type": ctype, "Cache-Control": "no-cache", **self._headers()})
        await response.prepare(request)  # the headers go out at once
        sent, stall = 0, faults.get("stall")
        try:
            for i, (kind, event) in enumerate(gen.events(include_usage)):
                await asyncio.sleep(faults.get("first_delay", 0.0) if i == 0 else self.token_delay_s)
                if kind in ("token", "final"):  # faults strike between generated tokens
                    if sent >= faults.get("break_after", float("inf")):
                        for tail in gen.stream_error():
                            await response.write(f"data: {tail}\n\n".encode())
                        return response
                    if sent >= faults.get("cut_after", float("inf")):
                        request.transport.close()  # no terminating chunk: the body is cut short
                        return response
                    if stall and sent >= stall[0]:
                        await asyncio.sleep(stall[1])
                        stall = None
                    sent += 1 if kind == "token" else 0
                await response.write(f"data: {event if isinstance(event, str) else _dump(event)}\n\n".encode())
        except ConnectionError:
            pass  # the client went away
        return response


class _Generation:
    """One answer, in the flavor's non-stream and stream shapes."""

    def __init__(self, up: FakeUpstream, body: dict, pieces: list[str], finish: str, calls=()):
        self.flavor, self.field, self.pieces, self.finish = up.flavor, up.reasoning_field, pieces, finish
        # (id, name, arguments) of each tool call, ids as each server makes them
        id_of = {
            "openai": lambda: "call_" + "".join(random.choices(string.ascii_letters + string.digits, k=24)),
            "vllm": lambda: "chatcmpl-tool-" + uuid.uuid4().hex,
            "ollama": lambda: "call_" + "".join(random.choices(string.ascii_lowercase + string.digits, k=8)),
            "llama_server": lambda: "".join(random.choices(string.ascii_letters + string.digits, k=32)),
        }[self.flavor]
        self.calls = [(id_of(), name, arguments) for name, arguments in calls]
        self.tool_deltas = self._tool_deltas()
        self.reasoning = _pieces(up.reasoning)
        self.model, self.created = body.get("model") or up.models[0], int(time.time())
        self.prompt_tokens = _words(body["messages"])
        self.completion_tokens = len(pieces) + len(self.reasoning)  # reasoning is generated text too
        self.completion_tokens += len(self.tool_deltas)
        rand = "".join(random.choices(string.ascii_letters + string.digits, k=29))
        suffix = {"openai": rand, "vllm": uuid.uuid4().hex, "ollama": str(random.randrange(999))}  # as each makes ids
        self.id = "chatcmpl-" + suffix.get(self.flavor, rand[:24])

    def _tool_deltas(self) -> list[dict]:
        """The stream's deltas carrying the calls (see the module docstring for each flavor's shape)."""
        out: list[dict] = []
        for index, (call_id, name, arguments) in enumerate(self.calls):
            head = {"index": index, "id": call_id, "type": "function"}
            if self.flavor == "ollama":  # whole, id first as openai.go's ToolCall struct orders it
                out.append(
                    {
                        "tool_calls": [
                            {"id": call_id, "index": index, "type": "function"}
                            | {"function": {"name": name, "arguments": arguments}}
                        ]
                    }
                )
                continue
            fragments = _fragments(arguments)
            if self.flavor == "openai":
                first = {"tool_calls": [head | {"function": {"name": name, "arguments": ""}}]}
                out.append(({"role": "assistant", "content": None} if index == 0 else {}) | first)
                out[-1] |= {"refusal": None} if index == 0 else {}
            elif self.flavor == "vllm":
                out.append(
                    {"tool_calls": [{"id": call_id, "type": "function", "index": index} | {"function": {"name": name}}]}
                )
            else:  # llama-server: the new call's diff already holds the arguments parsed so far
                first_args, fragments = fragments[0], fragments[1:]
                out.append({"tool_calls": [head | {"function": {"name": name, "arguments": first_args}}]})
            out += [{"tool_calls": [{"index": index, "function": {"arguments": f}}]} for f in fragments]
        return out

    def usage(self) -> dict:
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}
        usage["total_tokens"] = self.prompt_tokens + self.completion_tokens
        if self.flavor == "openai":
            usage["prompt_tokens_details"] = {"cached_tokens": 0, "audio_tokens": 0}
            details = dict.fromkeys(("audio_tokens", "accepted_prediction_tokens", "rejected_prediction_tokens"), 0)
            usage["completion_tokens_details"] = {"reasoning_tokens": len(self.reasoning)} | details
        elif self.flavor == "vllm" and self.reasoning:  # only with a reasoning parser
            usage["completion_tokens_details"] = {"reasoning_tokens": len(self.reasoning)}
        elif self.flavor == "llama_server":  # it reports no reasoning tokens
            usage["prompt_tokens_details"] = {"cached_tokens": 0}
        return usage

    def timings(self) -> dict:  # llama-server's result_timings
        n, p = self.completion_tokens, self.prompt_tokens
        prompt = dict(cache_n=0, prompt_n=p, prompt_ms=p * 0.5, prompt_per_token_ms=0.5, prompt_per_second=2e3)
        return prompt | dict(
            predicted_n=n, predicted_ms=n * 10.0, predicted_per_token_ms=10.0, predicted_per_second=1e2
        )

    def completion(self) -> dict:
        content, thought = "".join(self.pieces), "".join(self.reasoning)
        head = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model}
        message = {"role": "assistant", "content": content}
        if self.calls:
            message["content"] = "" if self.flavor == "ollama" else None
            message["tool_calls"] = [
                {"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in self.calls
            ]
        choice = {"index": 0, "message": message}
        if self.flavor == "openai":
            message |= {"refusal": None, "annotations": []} | ({self.field: thought} if self.field and thought else {})
            choice |= {"logprobs": None, "finish_reason": self.finish}
            tail = {"service_tier": "default", "system_fingerprint": OPENAI_FINGERPRINT}
            return head | {"choices": [choice], "usage": self.usage()} | tail
        if self.flavor == "vllm":  # ChatCompletionResponse.model_dump(): every field, nulls too
            message |= dict.fromkeys(("refusal", "annotations", "audio", "function_call"))
            message[self.field] = thought or None
            choice |= {"logprobs": None, "finish_reason": self.finish, "stop_reason": None, "token_ids": None}
            usage = dict.fromkeys(("prompt_tokens_details", "completion_tokens_details")) | self.usage()
            tail = dict.fromkeys(("prompt_logprobs", "prompt_token_ids", "kv_transfer_params"))
            return head | {"choices": [choice], "service_tier": None, "system_fingerprint": None, "usage": usage} | tail
        message |= {self.field: thought} if thought else {}
        if self.flavor == "ollama":  # ToChatCompletion
            choice |= {"finish_reason": self.finish}
            return head | {"system_fingerprint": "fp_ollama", "choices": [choice], "usage": self.usage()}
        choice = {"finish_reason": self.finish, "index": 0, "message": message}  # to_json_oaicompat_chat
        body = {"choices": [choice], "created": self.created, "model": self.model, "system_fingerprint": LLAMA_BUILD}
        return body | {"object": "chat.completion", "usage": self.usage(), "id": self.id, "timings": self.timings()}

    def _chunk(self, delta: dict, finish: str | None = None, choices: list | None = None) -> dict:
        head = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}
        choice = {"index": 0, "delta": delta}
        if self.flavor == "openai":
            choice |= {"logprobs": None, "finish_reason": finish}
            head |= {"service_tier": "default", "system_fingerprint": OPENAI_FINGERPRINT}
        elif self.flavor == "vllm":  # model_dump_json(exclude_unset=True): what serving.py sets
            choice |= {"logprobs": None, "finish_reason": finish} | ({"stop_reason": None} if finish else {})
            choice |= {"token_ids": None}
        elif self.flavor == "ollama":
            head |= {"system_fingerprint": "fp_ollama"}
            choice |= {"finish_reason": finish}
        else:
            choices = [{"finish_reason": finish, "index": 0, "delta": delta}] if choices is None else choices
            head = {"choices": choices, "created": self.created, "id": self.id, "model": self.model}
            return head | {"system_fingerprint": LLAMA_BUILD, "object": "chat.completion.chunk"}
        return head | {"choices": [choice] if choices is None else choices}

    def events(self, include_usage: bool) -> list[tuple[str, Any]]:
        """("role" | "token" | "final" | "usage" | "done", chunk) in the order the server sends them."""
        deltas = [{self.field: p} for p in self.reasoning] if self.field else []
        deltas += [{"content": p} for p in self.pieces] + self.tool_deltas
        if self.flavor == "ollama":  # reasoning deltas carry content "", the first chunk carries the role
            deltas = [{"content": ""} | d for d in deltas]
            deltas[:1] = [{"role": "assistant"} | d for d in deltas[:1]]
        out: list[tuple[str, Any]] = [("token", self._chunk(d)) for d in deltas]
        first = {"openai": {"content": "", "refusal": None}, "vllm": {"content": ""}, "llama_server": {"content": None}}
        if self.flavor in first and not (self.flavor == "openai" and self.calls):  # OpenAI: role in the call's delta
            role = self._chunk({"role": "assistant"} | first[self.flavor])
            out.insert(0, ("role", role | {"prompt_token_ids": None} if self.flavor == "vllm" else role))
        if self.flavor == "vllm" and self.finish == "length" and deltas:  # the last token carries the reason
            out[-1] = ("token", self._chunk(deltas[-1], self.finish))
        else:  # vLLM: the EOS token decodes to ""; the others send an empty delta
            out.append(("final", self._chunk({"content": ""} if self.flavor == "vllm" else {}, self.finish)))
        if include_usage:
            out = [(k, c | {"usage": None}) for k, c in out] if self.flavor == "openai" else out
            out.append(("usage", self._chunk({}, choices=[]) | {"usage": self.usage()}))
        if self.flavor == "llama_server":
            out[-1] = (out[-1][0], out[-1][1] | {"timings": self.timings()})
        if self.flavor == "openai":  # stream_options.include_obfuscation defaults to true
            pad = lambda: "".join(random.choices(string.ascii_letters, k=random.randint(2, 12)))  # noqa: E731
            out = [(k, c | {"obfuscation": pad()}) for k, c in out]
        return out + [("done", "[DONE]")]

    def stream_error(self) -> list[str]:
        """What a stream broken by an error on the server carries after the chunks so far."""
        if self.flavor == "ollama":  # ChatWriter decodes the NDJSON {"error": ...} line as an empty ChatResponse
            return [_dump(self._chunk({"content": ""}) | {"model": ""})]
        if self.flavor == "llama_server":  # then the stream ends, no [DONE]
            return [_dump({"error": {"code": 500, "message": "decode failed", "type": "server_error"}})]
        if self.flavor == "vllm":  # create_streaming_error_response, and [DONE] all the same
            error = {"message": "Internal server error", "type": "InternalServerError", "param": None, "code": 500}
            return [_dump({"error": error}), "[DONE]"]
        message = FAILURE_TEXT[("openai", 500)]
        return [_dump({"error": {"message": message, "type": "server_error", "param": None, "code": None}})]


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a fake model server on 127.0.0.1.")
    parser.add_argument("--flavor", choices=FLAVORS, default="vllm")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key-env", help="name of the environment variable that holds the API key")
    parser.add_argument("--model", action="append", help="a served model name (repeatable)")
    parser.add_argument("--reasoning", default="", help="text streamed as reasoning before each answer")
    args = parser.parse_args()
    key = os.environ[args.api_key_env] if args.api_key_env else None
    with FakeUpstream(args.flavor, key, args.model, args.reasoning, port=args.port) as up:
        print(f"{args.flavor} fake on {up.base_url}, models {up.models}" + (", key required" * bool(key)), flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
