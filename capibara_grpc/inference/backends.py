"""Generation over a model server's HTTP API: OpenAI's /chat/completions for every server
(llama-server, vLLM, Ollama, hosted APIs), llama-server's native /completion for `raw` prompts.

Both stream with Server-Sent Events and yield `Reasoning`, `Token` and `ToolCallDelta` items as
they arrive, then one `Finished`. Each server is sent only the fields it understands (capibara_grpc.upstream.kinds).
Leaving the generator early (client cancelled, deadline) closes the HTTP response, and the model
server stops generating for a closed connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator

from capibara_grpc import metrics
from capibara_grpc.chat.request import json_schema
from capibara_grpc.chat.types import (
    Finished,
    Generated,
    Message,
    Reasoning,
    SamplingParams,
    Token,
    ToolCallDelta,
)
from capibara_grpc.config import ModelConfig
from capibara_grpc.errors import MeshError, Unavailable
from capibara_grpc.inference.types import ModelStatus
from capibara_grpc.telemetry import spans
from capibara_grpc.upstream.client import NotTaken, Upstream
from capibara_grpc.upstream.replicas import ReplicaPicker, affinity_key

_LLAMA_STOP_TYPES = {"eos": "stop", "limit": "length", "word": "stop_sequence"}
_OPENAI_FINISH = {"stop": "stop", "length": "length", "eos": "stop"}


class ModelBackend:
    """One logical model served by one HTTP server (or Envoy's route to its replicas; or several
    servers, ReplicatedBackend)."""

    def __init__(self, model: ModelConfig, upstream: Upstream):
        self.model = model
        self.upstream = upstream

    @property
    def model_id(self) -> str:
        return self.model.model_id

    async def generate(self, messages: list[Message], params: SamplingParams) -> AsyncIterator[Generated]:
        raise NotImplementedError
        yield  # pragma: no cover - makes this an async generator for type checkers

    async def status(self) -> ModelStatus:
        healthy, detail = await self.upstream.healthy()
        return ModelStatus(
            model_id=self.model_id,
            backend_url=self.upstream.redact(self.model.backend.url),
            protocol=self.model.backend.protocol,
            chat_template=self.model.chat_template,
            healthy=healthy,
            status=detail,
            context_window=await self.upstream.context_window() if healthy else 0,
        )

    def _ended_early(self, what: str) -> Unavailable:
        """A stream that ended without its last event: counted against the server."""
        message = f"model '{self.model_id}' backend ended the stream without {what}"
        self.upstream.failed(message)
        return Unavailable(message)

    def _finished(self, reason: str, started: float, first_token_at, first_reasoning_at, **figures) -> Finished:
        now = time.perf_counter()
        return Finished(
            finish_reason=reason,
            time_to_first_token_ms=((first_token_at or now) - started) * 1000,
            time_to_first_reasoning_ms=(first_reasoning_at - started) * 1000 if first_reasoning_at else 0.0,
            total_ms=(now - started) * 1000,
            model_id=self.model_id,
            **figures,
        )


def message_json(m: Message) -> dict:
    """A message as the OpenAI API takes it: an assistant's tool calls, a tool's result."""
    if m.role == "assistant" and m.tool_calls:
        calls = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
        return {"role": "assistant", "content": m.content or None, "tool_calls": calls}
    if m.role == "tool":
        return {"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content}
    return {"role": m.role, "content": m.content}


def tool_fields(params: SamplingParams, named_tool_choice: bool = True, takes_tool_choice: bool = True) -> dict:
    """tools, tool_choice and parallel_tool_calls as the OpenAI API takes them. Each tool is the
    client's JSON parsed (key order kept), so the server gets the array the client sent."""
    if not params.tools:
        return {}
    tools, choice = [json_schema(text) for text in params.tools], params.tool_choice
    if choice == "none" and not takes_tool_choice:
        return {}  # a server that ignores tool_choice would still call them
    fields: dict = {"tools": tools}
    if choice in ("auto", "none", "required"):
        fields["tool_choice"] = choice
    elif choice and named_tool_choice:
        fields["tool_choice"] = {"type": "function", "function": {"name": choice}}
    elif choice:
        # The server cannot name a function in tool_choice (llama-server reads it as a string and
        # turns an object into "auto"; Ollama ignores it): offered only that tool, with a call
        # required, the model can call nothing else.
        fields["tools"] = [t for t in tools if t["function"]["name"] == choice]
        fields["tool_choice"] = "required"
    if params.parallel_tool_calls is not None:
        fields["parallel_tool_calls"] = params.parallel_tool_calls
    return fields


class ChatCompletionsBackend(ModelBackend):
    """POST <base>/chat/completions, streaming, with the server's chat template and parsing."""

    def request_body(self, messages: list[Message], params: SamplingParams) -> dict:
        """The OpenAI API's fields, then only the extras this kind of server takes."""
        kind = self.upstream.kind
        body = {
            "model": self.upstream.model_name,
            "messages": [message_json(m) for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.stop:
            body["stop"] = params.stop
        if params.seed is not None:
            body["seed"] = params.seed
        if params.reasoning_effort:
            body["reasoning_effort"] = params.reasoning_effort
        if params.json_schema:
            schema = json_schema(params.json_schema)
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
        body |= tool_fields(params, kind.named_tool_choice, kind.takes_tool_choice)
        for attribute, name in kind.extra_sampling.items():
            # None: left to the server (resolve() leaves repeat_penalty so while tools are offered).
            if (value := getattr(params, attribute)) is not None:
                body[name] = value
        body.update(kind.extra_fields)
        if params.stop and kind.verbose_for_stop:
            body["verbose"] = True
        return self.upstream.shape(body)

    async def generate(self, messages, params):
        started = time.perf_counter()
        body = self.request_body(messages, params)
        first_token_at = first_reasoning_at = None
        finish_reason, usage, timings, backend_model, stop_type = None, {}, {}, "", ""
        pieces = thoughts = tool_deltas = 0  # what the server sent: content, reasoning, tool call deltas
        # Pieces that arrived together go on as one Token (or Reasoning): one trip through the
        # mesh's hops instead of one per piece, when the server writes faster than the mesh reads.
        pending = _Pending()
        call_ids: dict[int, str] = {}
        events = self.upstream.stream(self.upstream.api_base + "/chat/completions", body, started)
        async with contextlib.aclosing(events):
            async for batch, watchdog in events:
                for event in batch:
                    backend_model = event.get("model") or backend_model
                    usage = event.get("usage") or usage
                    timings = event.get("timings") or timings
                    stop_type = (event.get("__verbose") or {}).get("stop_type") or stop_type
                    for choice in event.get("choices") or ():
                        delta = choice.get("delta") or {}
                        # Thinking: llama-server and DeepSeek `reasoning_content`, vLLM and Ollama `reasoning`.
                        thought = delta.get("reasoning_content") or delta.get("reasoning")
                        if thought and isinstance(thought, str):
                            watchdog.output()
                            first_reasoning_at = first_reasoning_at or time.perf_counter()
                            if item := pending.add(Reasoning, thought):
                                yield item
                            thoughts += 1
                        if text := delta.get("content"):
                            watchdog.output()
                            first_token_at = first_token_at or time.perf_counter()
                            if item := pending.add(Token, text):
                                yield item
                            pieces += 1
                        for position, call in enumerate(delta.get("tool_calls") or ()):
                            if item := _tool_call_delta(call, position, call_ids):
                                watchdog.output()
                                first_token_at = first_token_at or time.perf_counter()
                                if held := pending.take():
                                    yield held
                                yield item
                                tool_deltas += 1
                        finish_reason = choice.get("finish_reason") or finish_reason
                if held := pending.take():
                    yield held
        if finish_reason is None:
            raise self._ended_early("a finish reason")
        self.upstream.succeeded()
        details = usage.get("completion_tokens_details") or {}
        # The OpenAI API does not tell a stop string from end-of-sequence (both "stop");
        # llama-server's verbose stop_type does. An answer that called tools ends "tool_calls" even
        # where the server says "stop" (OpenAI and vLLM do for a tool_choice naming a function).
        reason = _LLAMA_STOP_TYPES.get(stop_type) or _OPENAI_FINISH.get(finish_reason, "stop")
        if call_ids and reason != "length":
            reason = "tool_calls"
        yield self._finished(
            reason,
            started,
            first_token_at,
            first_reasoning_at,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or pieces + thoughts + tool_deltas),
            reasoning_tokens=int(details.get("reasoning_tokens") or 0),
            prompt_ms=float(timings.get("prompt_ms") or 0),
            generation_ms=float(timings.get("predicted_ms") or 0),
            tokens_per_second=float(timings.get("predicted_per_second") or 0),
            backend_model=backend_model,
        )


class _Pending:
    """Text pieces of one kind (Token or Reasoning) held to be passed on together, numbered per
    kind as they are passed on."""

    __slots__ = ("kind", "texts", "sent")

    def __init__(self):
        self.kind: type | None = None
        self.texts: list[str] = []
        self.sent = {Token: 0, Reasoning: 0}

    def add(self, kind: type, text: str) -> Token | Reasoning | None:
        """Hold `text`; what was held of the other kind comes back, to be passed on first."""
        held = self.take() if self.kind is not kind else None
        self.kind = kind
        self.texts.append(text)
        return held

    def take(self) -> Token | Reasoning | None:
        if not self.texts:
            return None
        kind, text = self.kind, "".join(self.texts) if len(self.texts) > 1 else self.texts[0]
        self.texts = []
        item = kind(text, self.sent[kind])
        self.sent[kind] += 1
        return item


def _tool_call_delta(call: object, position: int, call_ids: dict[int, str]) -> ToolCallDelta | None:
    """One entry of a streamed delta.tool_calls ({index, id?, type?, function: {name?, arguments?}}).
    Servers differ in how they cut a call: OpenAI and vLLM send the id and name first, then
    argument fragments; llama-server's first piece may already hold arguments; Ollama sends each
    call whole. A call whose first piece has no id gets one here (clients answer by id)."""
    if not isinstance(call, dict):
        return None
    index = call.get("index")
    index = index if isinstance(index, int) and index >= 0 else position
    function = call.get("function") if isinstance(call.get("function"), dict) else {}
    name, arguments = function.get("name") or "", function.get("arguments") or ""
    call_id = call.get("id") or ""
    if index not in call_ids:
        call_ids[index] = call_id = call_id or "call_" + secrets.token_hex(12)
    elif call_id == call_ids[index]:
        call_id = ""  # said once
    if not (call_id or name or arguments):
        return None
    if not isinstance(arguments, str):  # a server that sends the arguments as an object
        arguments = json.dumps(arguments)
    return ToolCallDelta(index, call_id, str(name), arguments)


class LlamaCompletionBackend(ModelBackend):
    """llama-server's native /completion for `raw` prompts (no chat template): the messages'
    text as is, streamed."""

    async def generate(self, messages, params):
        started = time.perf_counter()
        body = {
            "prompt": "\n".join(m.content for m in messages if m.content),
            "stream": True,
            "n_predict": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "repeat_penalty": params.repeat_penalty,
            "stop": params.stop,
            "cache_prompt": True,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.json_schema:
            body["json_schema"] = json_schema(params.json_schema)
        first_token_at = None
        index = 0
        events = self.upstream.stream(self.upstream.root + "/completion", body, started)
        async with contextlib.aclosing(events):
            async for event, watchdog in _each(events):
                if text := event.get("content", ""):
                    watchdog.output()
                    first_token_at = first_token_at or time.perf_counter()
                    yield Token(text=text, index=index)
                    index += 1
                if event.get("stop"):
                    self.upstream.succeeded()
                    timings = event.get("timings") or {}
                    yield self._finished(
                        _LLAMA_STOP_TYPES.get(event.get("stop_type", "eos"), "stop"),
                        started,
                        first_token_at,
                        None,
                        prompt_tokens=int(event.get("tokens_evaluated") or timings.get("prompt_n") or 0),
                        completion_tokens=int(event.get("tokens_predicted") or timings.get("predicted_n") or 0),
                        prompt_ms=float(timings.get("prompt_ms") or 0),
                        generation_ms=float(timings.get("predicted_ms") or 0),
                        tokens_per_second=float(timings.get("predicted_per_second") or 0),
                        backend_model=str(event.get("model") or ""),
                    )
                    return
        raise self._ended_early("a final event")


async def _each(batches):
    """Upstream.stream's events one by one, each with the watchdog."""
    async for batch, watchdog in batches:
        for event in batch:
            yield event, watchdog


class ReplicatedBackend(ModelBackend):
    """A model whose servers (backend.url and its replicas) the inference service balances itself
    (backend.balance: affinity): each chat goes to the server the picker chooses
    (capibara_grpc/upstream/replicas.py), and to another one when the chosen server does not take
    it (refused, reset, 503) before its first token. The choices are Prometheus metrics
    (capibara_replica_*), which the status page reads."""

    def __init__(self, model: ModelConfig, servers: list[ModelBackend]):
        super().__init__(model, servers[0].upstream)
        self.servers = servers
        self.picker = ReplicaPicker([s.upstream.url for s in servers], model.server_slots)
        names = [s.upstream.redact(s.upstream.url) for s in servers]
        mid = model.model_id
        self._in_flight = [metrics.REPLICA_IN_FLIGHT.labels(mid, name) for name in names]
        self._pinned = [metrics.REPLICA_PINNED.labels(mid, name) for name in names]
        self._up = [metrics.REPLICA_UP.labels(mid, name) for name in names]
        self._names = names
        for gauge in self._up:
            gauge.set(1)

    async def generate(self, messages, params):
        key = affinity_key(messages)
        tried: list[int] = []
        while True:
            choice = self.picker.choose(key, tried)
            self._published(choice.index, choice.outcome, choice.at)
            if (model_call := spans.current.get()) is not None:  # telemetry/genai.py's span: which server
                host, port = self.servers[choice.index].upstream.address
                model_call.update(
                    {"server.address": host, "server.port": port, "capibara.replica.choice": choice.outcome}
                )
            index = choice.index
            self.picker.begin(index)
            self._in_flight[index].inc()
            try:
                items = self.servers[index].generate(messages, params)
                async with contextlib.aclosing(items):
                    async for item in items:
                        yield item
                return
            except NotTaken as exc:  # raised before any item: nothing was sent to the caller
                self.picker.refused(index, exc.message)
                self._up[index].set(0)
                tried.append(index)
                if len(tried) >= len(self.servers):
                    raise
            finally:
                self.picker.end(index)
                self._in_flight[index].dec()

    def _published(self, index: int, outcome: str, at: float) -> None:
        mid, name = self.model_id, self._names[index]
        metrics.REPLICA_CHOICES.labels(mid, name, outcome).inc()
        metrics.REPLICA_LAST_CHOICE.labels(mid, name, outcome).set(at)
        for gauge, replica in zip(self._pinned, self.picker.replicas, strict=True):
            gauge.set(replica.pinned)

    async def status(self) -> ModelStatus:
        verdicts = await asyncio.gather(*(s.upstream.healthy() for s in self.servers))
        for index, (healthy, detail) in enumerate(verdicts):
            self.picker.set_health(index, healthy, detail)
            self._up[index].set(1 if self.picker.up(index) else 0)
        down = [
            f"{name}: {detail}" for name, (healthy, detail) in zip(self._names, verdicts, strict=True) if not healthy
        ]
        up = [s for s, (healthy, _) in zip(self.servers, verdicts, strict=True) if healthy]
        if not up:
            detail = "every server is down: " + "; ".join(down)
        elif down:
            detail = f"ok ({len(down)} of {len(self.servers)} servers down: {'; '.join(down)})"
        else:
            detail = "ok"
        return ModelStatus(
            model_id=self.model_id,
            backend_url=self.upstream.redact(self.model.backend.url),
            protocol=self.model.backend.protocol,
            chat_template=self.model.chat_template,
            healthy=bool(up),
            status=detail,
            context_window=await up[0].upstream.context_window() if up else 0,
        )


def server_urls(model: ModelConfig) -> list[str]:
    """Where to call each of the model's servers: backend.url, then each replica with backend.url's
    path (an OpenAI base URL's /v1)."""
    return [model.backend.url.rstrip("/"), *(r.rstrip("/") + model.backend.url_path for r in model.backend.replicas)]


def make_backend(model: ModelConfig, upstream: Upstream) -> ModelBackend:
    if model.affinity_replicas:
        urls = server_urls(model)
        upstreams = [upstream if upstream.url == urls[0] else upstream.sibling(urls[0])]
        upstreams += [upstream.sibling(url) for url in urls[1:]]
        return ReplicatedBackend(model, [_one_server(model, u) for u in upstreams])
    return _one_server(model, upstream)


def _one_server(model: ModelConfig, upstream: Upstream) -> ModelBackend:
    if model.backend.protocol == "llama_cpp" and model.chat_template == "raw":
        return LlamaCompletionBackend(model, upstream)
    if model.backend.protocol in ("llama_cpp", "openai"):
        return ChatCompletionsBackend(model, upstream)
    raise MeshError(f"unknown protocol {model.backend.protocol}")
