"""One model's server as the mesh calls it: its URLs, its credentials and TLS, its optional
endpoints, and its HTTP failures turned into mesh errors.

- The base URL is the OpenAI SDKs' (…/v1); llama-server's own endpoints and vLLM's /tokenize sit at
  the server's root, the base URL without its /v1.
- The key and header values come from the environment once, at start; every text that leaves
  this module (errors, health details) has them masked, whatever the server echoed back.
- 429 sets a cool-down from Retry-After: until it ends, a chat fails at once (and fails over)
  without calling the server again.
- A stream is watched by one timer: no first token (answer or reasoning) within
  first_token_timeout_s, or a started stream silent for idle_timeout_s, closes it.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import email.utils
import json
import math
import os
import ssl
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson

from capibara_grpc.config import MeshConfig
from capibara_grpc.config.schema import ENV_REFERENCE, url_host_port
from capibara_grpc.errors import BackendRefusedKey, InvalidArgument, ResourceExhausted, Unavailable
from capibara_grpc.telemetry import spans
from capibara_grpc.upstream.kinds import DEFAULT_CONTEXT_WINDOW, KINDS, estimated_tokens

# A server whose chats failed this many times in a row within FAILURE_WINDOW_S, with no success
# since, is reported unhealthy even when its /models answers (a server without /health).
FAILURES_TO_DOWN = 3
FAILURE_WINDOW_S = 30.0
# Seconds of cool-down after a 429 without a usable Retry-After, and at most (a server asking for
# a day, its quota spent, is asked again within minutes: the health and the chats then say so).
DEFAULT_RETRY_AFTER_S = 1
MAX_RETRY_AFTER_S = 600
# An error answer is read at most this long and this far (a stalled body must not hold the chat).
ERROR_BODY_TIMEOUT_S = 5.0
ERROR_BODY_BYTES = 64 * 1024
# Seconds between two GET /models of a server without /health (its health in between comes from
# its chats).
MODELS_PROBE_S = 15.0
# Seconds before a tokenizer that failed (not one that is missing) is asked again.
TOKENIZER_RETRY_S = 30.0


class NotTaken(Unavailable):
    """The server did not take the call: it refused or reset the connection, or answered 503
    (llama-server while loading its model), before any answer. Another server of the model may."""


class Upstream:
    """One model's server (or Envoy's route to its replicas)."""

    def __init__(self, config: MeshConfig, model_id: str, session: aiohttp.ClientSession, url: str = ""):
        """`url`: one of the model's servers (backend.url or a replica) instead of where the
        configuration says to call the model."""
        model = config.model(model_id)
        backend = model.backend
        self.config = config
        self.model_id = model_id
        self.model_name = backend.model_name or model_id
        self.kind = KINDS[model.server_kind]
        self.configured_window = model.context_window
        self.url = url.rstrip("/") if url else config.backend_base_url(model_id)
        self.address = url_host_port(self.url)  # (host, port): the model call's span says it
        has_path = backend.protocol == "openai" and backend.url_path
        self.api_base = self.url if has_path else self.url + "/v1"
        self.root = self.api_base.removesuffix("/v1")
        self.session = session
        values = {name: os.environ.get(name, "") for name in backend.env_names}
        self.headers = {
            name: ENV_REFERENCE.sub(lambda m: values.get(m.group(1), ""), value)
            for name, value in backend.headers.items()
        }
        if backend.api_key_env:
            self.headers["Authorization"] = f"Bearer {values[backend.api_key_env]}"
        # A chat's body is serialized here (orjson), so the type is said here too.
        self.post_headers = {"Content-Type": "application/json", **self.headers}
        # Longest first, so that a secret containing another is masked whole.
        self._secrets = sorted({v for v in values.values() if len(v) >= 4}, key=len, reverse=True)
        self.ssl: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(config.resolve_path(backend.ca_file))) if backend.ca_file else True
        )
        self.backend = backend
        self._cool_down_until = 0.0
        self._failures: collections.deque[tuple[float, str]] = collections.deque(maxlen=FAILURES_TO_DOWN)
        self._window: int | None = None
        self._tokenizer_missing = not self.kind.tokenize_path
        self._tokenizer_retry_at = 0.0
        self._window_retry_at = 0.0
        self._probe: tuple[bool, str] = (False, "not checked yet")
        self._probed_at = -MODELS_PROBE_S

    # -- text that leaves the module ---------------------------------------------------------------

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _error_text(self, body: str) -> str:
        """The message of a server's JSON error ({"error": {"message"}} or vLLM's older
        {"message"}), else the raw text; secrets masked, at most 500 characters."""
        try:
            parsed = json.loads(body)
            error = parsed.get("error", parsed) if isinstance(parsed, dict) else None
            if isinstance(error, dict) and error.get("message"):
                body = str(error["message"])
            elif isinstance(error, str):
                body = error
        except ValueError:
            pass
        return self.redact(body)[:500]

    def shape(self, body: dict) -> dict:
        """A chat request's body as this server takes it: fields it refuses left out, fields it
        names otherwise renamed (backend.drop_fields, backend.rename_fields)."""
        drop, rename = self.backend.drop_fields, self.backend.rename_fields
        if not (drop or rename):
            return body
        return {rename.get(k, k): v for k, v in body.items() if k not in drop}

    # -- recent failures ---------------------------------------------------------------------------

    def failed(self, message: str) -> None:
        self._failures.append((time.monotonic(), message))

    def succeeded(self) -> None:
        self._failures.clear()

    def recent_failure(self) -> str | None:
        """Why the server is judged down by its recent chats, or None."""
        if len(self._failures) < FAILURES_TO_DOWN or time.monotonic() - self._failures[0][0] > FAILURE_WINDOW_S:
            return None
        return f"its last {FAILURES_TO_DOWN} chats failed: {self._failures[-1][1]}"

    # -- calls -------------------------------------------------------------------------------------

    async def stream(self, url: str, body: dict, started: float) -> AsyncIterator[tuple[list[dict], Watchdog]]:
        """POST a streaming request sent at `started` (time.perf_counter) and yield its SSE events
        (`data: {...}`, until `data: [DONE]` or the end) in batches: the events that arrived in one
        read, several when the server writes faster than the mesh reads (the caller passes their
        tokens on together). Each batch comes with the stream's watchdog, which the caller tells
        of output (watchdog.output()). An in-band `{"error": ...}`, a cut or a timeout
        is UNAVAILABLE and counts against the server. Leaving early closes the response (iterate
        under contextlib.aclosing), and the dropped connection tells the server to stop."""
        response = await self._post(url, body)
        watchdog = Watchdog(
            response, started + self.backend.first_token_timeout_s - time.perf_counter(), self.backend.idle_timeout_s
        )
        try:
            done = False
            async for lines in _line_batches(response, watchdog):
                events = []
                try:
                    for line in lines:
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            done = True
                            break
                        if (event := self._event(payload)) is not None:
                            events.append(event)
                except Unavailable:
                    # An in-band error after tokens of the same read: the tokens go first, so the
                    # error ends a stream that has started (in band), as it would a read later.
                    if events:
                        yield events, watchdog
                    raise
                if events:
                    yield events, watchdog
                if done:
                    break
            if watchdog.expired:  # closed by the watchdog between two reads
                raise Unavailable(f"model '{self.model_id}' backend {watchdog.expired}")
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            why = watchdog.expired or f"closed the stream: {self.redact(str(exc))}"
            self.failed(message := f"model '{self.model_id}' backend {why}")
            raise Unavailable(message) from exc
        except Unavailable as exc:
            self.failed(exc.message)
            raise
        finally:
            watchdog.cancel()
            response.close()  # closing, not releasing: the connection is dropped

    def _headers(self) -> dict[str, str]:
        """The request's headers: with the model call's span as `traceparent` when traced
        (telemetry/genai.py), so that a model server that traces joins the chat's trace."""
        active = spans.current.get()
        if active is None:
            return self.post_headers
        return {**self.post_headers, spans.TRACEPARENT: active.traceparent}

    async def _post(self, url: str, body: dict) -> aiohttp.ClientResponse:
        """POST and return the open 200 response; waiting for it counts towards
        first_token_timeout_s."""
        remaining = self._cool_down_until - time.monotonic()
        if remaining > 0:
            raise ResourceExhausted(
                f"model '{self.model_id}' is rate limited by its server for {math.ceil(remaining)} s more",
                math.ceil(remaining),
            )
        try:
            async with asyncio.timeout(self.backend.first_token_timeout_s):
                response = await self.session.post(
                    url,
                    data=orjson.dumps(body),
                    headers=self._headers(),
                    ssl=self.ssl,
                    timeout=aiohttp.ClientTimeout(sock_connect=self.backend.connect_timeout_s),
                )
        except aiohttp.ClientConnectionError as exc:  # refused, reset, or no connection in connect_timeout_s
            message = (
                f"model '{self.model_id}' is unavailable: backend {self.url} unreachable ({exc.__class__.__name__})"
            )
            self.failed(message)
            raise NotTaken(message) from exc
        except TimeoutError as exc:
            message = f"model '{self.model_id}' backend {self.url} did not answer within {self.backend.first_token_timeout_s:g} s"
            self.failed(message)
            raise Unavailable(message) from exc
        if response.status != 200:
            async with response:
                try:
                    async with asyncio.timeout(ERROR_BODY_TIMEOUT_S):
                        body = await response.content.read(ERROR_BODY_BYTES)
                    text = self._error_text(body.decode(errors="replace"))
                except (TimeoutError, aiohttp.ClientError):
                    text = "(no readable error body)"
            raise self._status_error(response.status, url, text, response.headers.get("Retry-After"))
        return response

    def _status_error(self, status: int, url: str, text: str, retry_after: str | None) -> Exception:
        """A non-200 answer as the mesh error a client should see."""
        who = f"model '{self.model_id}'"
        if status in (401, 403):
            env = self.backend.api_key_env
            key = f" (backend.api_key_env {env})" if env else " (no backend.api_key_env set)"
            message = f"{who}: its server refused the mesh's API key{key}: HTTP {status}: {text}"
            self.failed(message)
            return BackendRefusedKey(message)
        if status == 429:
            seconds = _retry_after_s(retry_after)
            self._cool_down_until = time.monotonic() + seconds
            return ResourceExhausted(f"{who} is rate limited by its server (HTTP 429: {text})", seconds)
        if status in (400, 413, 422):
            return InvalidArgument(f"{who} rejected the request: {text}")
        message = f"{who} is unavailable: backend {self.url} answered HTTP {status} ({text})"
        if status == 404:
            message += f"; check backend.url (POST {self.redact(url)}) and model_name '{self.model_name}'"
        self.failed(message)
        return NotTaken(message) if status == 503 else Unavailable(message)

    def sibling(self, url: str) -> Upstream:
        """The same model's server at `url` (a replica), sharing this one's connections."""
        return Upstream(self.config, self.model_id, self.session, url)

    async def get_json(self, url: str, timeout_s: float = 2.0) -> tuple[int, dict]:
        """(status, JSON object body or {}); connection errors and timeouts propagate."""
        async with self.session.get(
            url, headers=self.headers, ssl=self.ssl, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as response:
            try:
                body = await response.json(content_type=None)
            except (ValueError, aiohttp.ContentTypeError):
                body = {}
            return response.status, body if isinstance(body, dict) else {}

    def _event(self, payload: bytes) -> dict | None:
        """One SSE `data:` payload as an event (None for one that is not an object); an in-band
        `{"error": ...}`, or text that is not JSON, is UNAVAILABLE."""
        try:
            event = _loads(payload)
        except ValueError:
            text = self.redact(payload[:200].decode(errors="replace"))
            raise Unavailable(f"model '{self.model_id}' backend sent an event that is not JSON: {text}") from None
        if not isinstance(event, dict):
            return None
        if "error" in event:
            message = self._error_text(payload.decode(errors="replace"))
            raise Unavailable(f"model '{self.model_id}' backend reported an error mid-stream: {message}")
        return event

    # -- optional endpoints --------------------------------------------------------------------------

    async def healthy(self) -> tuple[bool, str]:
        """(healthy, "ok" or why not): GET /health where the server has it, else GET /models
        (at most every MODELS_PROBE_S: a hosted API counts every call); then the recent chats."""
        if self.kind.has_health or time.monotonic() >= self._probed_at + MODELS_PROBE_S:
            self._probe = await self._probe_server()
            self._probed_at = time.monotonic()
        failure = self.recent_failure()
        return (False, failure) if self._probe[0] and failure else self._probe

    async def _probe_server(self) -> tuple[bool, str]:
        url = f"{self.root}/health" if self.kind.has_health else f"{self.api_base}/models"
        try:
            code, body = await self.get_json(url)
        except (TimeoutError, aiohttp.ClientError) as exc:
            return False, f"unreachable ({exc.__class__.__name__})"
        if code in (401, 403):
            return False, f"its server refused the mesh's API key (HTTP {code} to GET {url})"
        if code != 200:
            error = body.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            return False, self.redact(str(message or f"HTTP {code}"))[:300]
        return True, "ok"

    async def context_window(self) -> int:
        """Tokens the model sees at once: configured, else as the server reports it (asked once
        successfully; a failed ask is tried again after TOKENIZER_RETRY_S), else
        DEFAULT_CONTEXT_WINDOW. Never fails."""
        if self.configured_window:
            return self.configured_window
        if self._window is None:
            if time.monotonic() < self._window_retry_at:
                return DEFAULT_CONTEXT_WINDOW
            try:
                window = await self._reported_window()
            except (TimeoutError, aiohttp.ClientError, ValueError, TypeError):
                window = None
            if window is None:  # not answered (loading, down, refused): asked again later
                self._window_retry_at = time.monotonic() + TOKENIZER_RETRY_S
                return DEFAULT_CONTEXT_WINDOW
            self._window = window or DEFAULT_CONTEXT_WINDOW
        return self._window

    async def _reported_window(self) -> int | None:
        """The window the server reports; 0 when it reports none, None when it did not answer."""
        if self.kind.context_window_source == "props":
            code, props = await self.get_json(f"{self.root}/props")
            return int((props.get("default_generation_settings") or {}).get("n_ctx") or 0) if code == 200 else None
        if self.kind.context_window_source == "models":
            code, models = await self.get_json(f"{self.api_base}/models")
            if code != 200:
                return None
            entries = models.get("data") or []
            named = [e for e in entries if e.get("id") == self.model_name] or entries
            return int(named[0].get("max_model_len") or 0) if named else 0
        return 0

    async def count_tokens(self, text: str) -> tuple[int, bool]:
        """(tokens of `text`, exact): the server's tokenizer where it has one, else an estimate.
        A tokenizer that fails is given up for good after a 404 (the endpoint is missing), for
        TOKENIZER_RETRY_S otherwise (a server that is down costs no wait per count); the chat
        never fails for it."""
        if not self._tokenizer_missing and time.monotonic() >= self._tokenizer_retry_at:
            try:
                async with self.session.post(
                    self.root + self.kind.tokenize_path,
                    json=self.kind.tokenize_body(self.model_name, text),
                    headers=self.headers,
                    ssl=self.ssl,
                    timeout=aiohttp.ClientTimeout(total=5),
                ) as response:
                    if response.status == 200:
                        return self.kind.token_count(await response.json(content_type=None)), True
                    self._tokenizer_missing = response.status in (404, 405, 501)
            except (TimeoutError, aiohttp.ClientError, ValueError, KeyError, TypeError):
                pass
            self._tokenizer_retry_at = time.monotonic() + TOKENIZER_RETRY_S
        return estimated_tokens(text), False


class Watchdog:
    """Closes a response whose first output does not come within `first_s`, or which goes
    `idle_s` without data once output has started. One timer, re-armed lazily (not per token)."""

    def __init__(self, response: aiohttp.ClientResponse, first_s: float, idle_s: float):
        self.loop = asyncio.get_running_loop()
        self.response = response
        self.idle_s = idle_s
        self.started = False
        self.deadline = self.loop.time() + first_s
        self.expired = ""
        self._handle = self.loop.call_at(self.deadline, self._check)

    def output(self) -> None:
        self.deadline = self.loop.time() + self.idle_s
        if not self.started:
            # The timer waits for the first-token deadline; the idle one may come sooner.
            self.started = True
            self._handle.cancel()
            self._handle = self.loop.call_at(self.deadline, self._check)

    def data(self) -> None:
        if self.started:
            self.deadline = self.loop.time() + self.idle_s

    def _check(self) -> None:
        if self.loop.time() < self.deadline:
            self._handle = self.loop.call_at(self.deadline, self._check)
            return
        self.expired = (
            f"sent nothing for {self.idle_s:g} s in the middle of the stream (idle_timeout_s)"
            if self.started
            else "sent no first token in time (first_token_timeout_s)"
        )
        self.response.close()

    def cancel(self) -> None:
        self._handle.cancel()


async def _line_batches(response: aiohttp.ClientResponse, watchdog: Watchdog) -> AsyncIterator[list[bytes]]:
    """The body's complete lines, stripped, however long (llama-server's verbose final event
    repeats the whole prompt: longer than aiohttp's readline takes), as they arrived: one list
    per read."""
    pending = b""
    async for data in response.content.iter_any():
        watchdog.data()
        *lines, pending = (pending + data).split(b"\n")
        if lines:
            yield [line.strip() for line in lines]
    if pending.strip():
        yield [pending.strip()]


def _loads(payload: bytes):
    """An SSE event's JSON: orjson (several times quicker, once per event), or the json module for
    what orjson refuses and json reads (NaN, Infinity, numbers past 64 bits)."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return json.loads(payload)


def _retry_after_s(value: str | None) -> int:
    """Retry-After in seconds (delta-seconds or an HTTP date, UTC when it names no zone), at
    least 1 and at most MAX_RETRY_AFTER_S."""
    seconds = DEFAULT_RETRY_AFTER_S
    if value and value.strip().isdigit():
        seconds = int(value.strip())
    elif value:
        try:
            when = email.utils.parsedate_to_datetime(value)
            if when.tzinfo is None:
                when = when.replace(tzinfo=datetime.UTC)
            seconds = math.ceil(when.timestamp() - time.time())
        except (TypeError, ValueError):
            pass
    return min(max(1, seconds), MAX_RETRY_AFTER_S)
