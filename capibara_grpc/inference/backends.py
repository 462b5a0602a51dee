"""HTTP clients for model servers: llama.cpp's native API and the OpenAI-compatible API.

Both stream with Server-Sent Events over aiohttp and yield `Token`s as they arrive, then one
`Finished`. Leaving the generator early (client cancelled, deadline) closes the HTTP response, and
the model server stops generating for a closed connection.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import aiohttp

from capibara_grpc.chat_types import Finished, Message, SamplingParams, Token
from capibara_grpc.config import ModelConfig
from capibara_grpc.errors import InvalidArgument, MeshError, Unavailable
from capibara_grpc.inference.types import ModelStatus

_LLAMA_STOP_TYPES = {"eos": "stop", "limit": "length", "word": "stop_sequence"}
_OPENAI_FINISH = {"stop": "stop", "length": "length", "eos": "stop"}


async def _sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """Decode `data: {...}` lines of an SSE body; ends at `data: [DONE]` or end of body."""
    async for raw_line in response.content:
        line = raw_line.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return
        event = json.loads(payload)
        if isinstance(event, dict) and "error" in event:
            error = event["error"]
            message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
            raise Unavailable(f"backend reported an error mid-stream: {message}")
        yield event


def _error_text(body: str) -> str:
    """The message of a backend's JSON error ({"error": {"message": ...}}), else the raw text."""
    try:
        error = json.loads(body).get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
    except (json.JSONDecodeError, AttributeError):
        pass
    return body[:500]


class ModelBackend:
    """One logical model served by one HTTP backend."""

    def __init__(self, model: ModelConfig, session: aiohttp.ClientSession, base_url: str):
        self.model = model
        self.session = session
        self.base_url = base_url

    @property
    def model_id(self) -> str:
        return self.model.model_id

    def resolve(self, params: SamplingParams) -> SamplingParams:
        """Fill unset parameters with the model's configured defaults."""
        defaults = self.model.defaults
        return SamplingParams(
            max_tokens=params.max_tokens if params.max_tokens is not None else defaults.max_tokens,
            temperature=params.temperature if params.temperature is not None else defaults.temperature,
            top_p=params.top_p if params.top_p is not None else defaults.top_p,
            repeat_penalty=params.repeat_penalty if params.repeat_penalty is not None else defaults.repeat_penalty,
            stop=list(params.stop),
            seed=params.seed,
            top_k=params.top_k if params.top_k is not None else defaults.top_k,
            json_schema=params.json_schema,
        )

    async def _post(self, path: str, body: dict) -> aiohttp.ClientResponse:
        """POST and return the open response, with backend errors mapped to mesh errors."""
        url = self.base_url + path
        try:
            response = await self.session.post(
                url, json=body, timeout=aiohttp.ClientTimeout(sock_connect=self.model.backend.connect_timeout_s)
            )
        except (TimeoutError, aiohttp.ClientConnectionError) as exc:
            raise Unavailable(
                f"model '{self.model_id}' is unavailable: backend {self.base_url} unreachable ({exc.__class__.__name__})"
            ) from exc
        if response.status != 200:
            text = _error_text(await response.text())
            response.release()
            if response.status == 503:
                raise Unavailable(
                    f"model '{self.model_id}' is unavailable: backend {self.base_url} answered 503 ({text})"
                )
            if response.status == 400:
                raise InvalidArgument(f"model '{self.model_id}' rejected the request: {text}")
            raise Unavailable(f"model '{self.model_id}' backend {url} answered HTTP {response.status}: {text}")
        return response

    async def _get_json(self, path: str, timeout_s: float = 2.0) -> tuple[int, dict]:
        async with self.session.get(self.base_url + path, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            try:
                body = await response.json(content_type=None)
            except (json.JSONDecodeError, aiohttp.ContentTypeError):
                body = {}
            return response.status, body if isinstance(body, dict) else {}

    async def generate(self, messages: list[Message], params: SamplingParams) -> AsyncIterator[Token | Finished]:
        raise NotImplementedError

    async def status(self) -> ModelStatus:
        raise NotImplementedError

    def _status(self, healthy: bool, status: str, context_window: int = 0) -> ModelStatus:
        return ModelStatus(
            model_id=self.model_id,
            backend_url=self.base_url,
            protocol=self.model.backend.protocol,
            chat_template=self.model.chat_template,
            healthy=healthy,
            status=status,
            context_window=context_window,
        )


class LlamaCppBackend(ModelBackend):
    """llama-server's native API: /apply-template then /completion with stream=true."""

    async def _prompt(self, messages: list[Message]) -> str:
        if self.model.chat_template == "raw":
            return "\n".join(m.content for m in messages if m.content)
        # The backend renders the GGUF's own chat template (with the generation prompt), so the
        # model sees exactly the format it was trained on.
        response = await self._post("/apply-template", {"messages": [m.__dict__ for m in messages]})
        async with response:
            body = await response.json(content_type=None)
        return body["prompt"]

    async def generate(self, messages, params):
        started = time.perf_counter()
        params = self.resolve(params)
        prompt = await self._prompt(messages)
        body = {
            "prompt": prompt,
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
            body["json_schema"] = json.loads(params.json_schema)
        response = await self._post("/completion", body)
        first_token_at = None
        index = 0
        try:
            async for event in _sse_events(response):
                text = event.get("content", "")
                if text:
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                    yield Token(text=text, index=index)
                    index += 1
                if event.get("stop"):
                    timings = event.get("timings") or {}
                    total_ms = (time.perf_counter() - started) * 1000
                    yield Finished(
                        finish_reason=_LLAMA_STOP_TYPES.get(event.get("stop_type", "eos"), "stop"),
                        prompt_tokens=int(event.get("tokens_evaluated") or timings.get("prompt_n") or 0),
                        completion_tokens=int(event.get("tokens_predicted") or timings.get("predicted_n") or 0),
                        time_to_first_token_ms=((first_token_at or time.perf_counter()) - started) * 1000,
                        prompt_ms=float(timings.get("prompt_ms") or 0),
                        generation_ms=float(timings.get("predicted_ms") or 0),
                        tokens_per_second=float(timings.get("predicted_per_second") or 0),
                        total_ms=total_ms,
                        model_id=self.model_id,
                        backend_model=str(event.get("model") or ""),
                    )
                    return
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise Unavailable(f"model '{self.model_id}' backend closed the stream: {exc}") from exc
        finally:
            # Closing (not releasing) drops the connection, which tells llama-server to stop.
            response.close()
        raise Unavailable(f"model '{self.model_id}' backend ended the stream without a final event")

    async def status(self):
        try:
            code, health = await self._get_json("/health")
            if code != 200:
                message = (health.get("error") or {}).get("message") if isinstance(health.get("error"), dict) else None
                return self._status(False, message or f"HTTP {code}")
            _, props = await self._get_json("/props")
            n_ctx = int((props.get("default_generation_settings") or {}).get("n_ctx") or 0)
            return self._status(True, "ok", n_ctx)
        except (TimeoutError, aiohttp.ClientError) as exc:
            return self._status(False, f"unreachable ({exc.__class__.__name__})")


class OpenAIBackend(ModelBackend):
    """/v1/chat/completions streaming: vLLM, llama-server and other OpenAI-compatible servers."""

    async def generate(self, messages, params):
        started = time.perf_counter()
        params = self.resolve(params)
        body = {
            "model": self.model.backend.model_name or self.model_id,
            "messages": [m.__dict__ for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            # Not in the OpenAI API: llama-server reads repeat_penalty, vLLM repetition_penalty.
            "repeat_penalty": params.repeat_penalty,
            "repetition_penalty": params.repeat_penalty,
            "top_k": params.top_k,
        }
        if params.stop:
            body["stop"] = params.stop
        if params.seed is not None:
            body["seed"] = params.seed
        if params.json_schema:
            schema = json.loads(params.json_schema)
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
        response = await self._post("/v1/chat/completions", body)
        first_token_at = None
        finish_reason, usage, timings, backend_model = None, {}, {}, ""
        index = 0
        try:
            async for event in _sse_events(response):
                backend_model = event.get("model") or backend_model
                usage = event.get("usage") or usage
                timings = event.get("timings") or timings
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or ""
                    if text:
                        if first_token_at is None:
                            first_token_at = time.perf_counter()
                        yield Token(text=text, index=index)
                        index += 1
                    finish_reason = choice.get("finish_reason") or finish_reason
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise Unavailable(f"model '{self.model_id}' backend closed the stream: {exc}") from exc
        finally:
            response.close()
        if finish_reason is None:
            raise Unavailable(f"model '{self.model_id}' backend ended the stream without a finish reason")
        # The OpenAI API does not tell a stop string from end-of-sequence: both are "stop".
        reason = _OPENAI_FINISH.get(finish_reason, "stop")
        generation_ms = float(timings.get("predicted_ms") or 0)
        completion_tokens = int(usage.get("completion_tokens") or index)
        yield Finished(
            finish_reason=reason,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=completion_tokens,
            time_to_first_token_ms=((first_token_at or time.perf_counter()) - started) * 1000,
            prompt_ms=float(timings.get("prompt_ms") or 0),
            generation_ms=generation_ms,
            tokens_per_second=float(timings.get("predicted_per_second") or 0),
            total_ms=(time.perf_counter() - started) * 1000,
            model_id=self.model_id,
            backend_model=backend_model,
        )

    async def status(self):
        try:
            code, body = await self._get_json("/v1/models")
            if code != 200:
                return self._status(False, f"HTTP {code}")
            context_window = 0
            for entry in body.get("data") or []:
                context_window = int(entry.get("max_model_len") or (entry.get("meta") or {}).get("n_ctx_train") or 0)
                break
            # llama-server's /v1/models reports the training context; /props has the real one.
            code, props = await self._get_json("/props")
            if code == 200:
                context_window = int((props.get("default_generation_settings") or {}).get("n_ctx") or context_window)
            return self._status(True, "ok", context_window)
        except (TimeoutError, aiohttp.ClientError) as exc:
            return self._status(False, f"unreachable ({exc.__class__.__name__})")


BACKENDS: dict[str, type[ModelBackend]] = {"llama_cpp": LlamaCppBackend, "openai": OpenAIBackend}


def make_backend(model: ModelConfig, session: aiohttp.ClientSession, base_url: str) -> ModelBackend:
    try:
        return BACKENDS[model.backend.protocol](model, session, base_url)
    except KeyError:
        raise MeshError(f"unknown protocol {model.backend.protocol}") from None
