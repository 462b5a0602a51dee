"""Inference core: validates requests, picks the model's backend, watches backend health."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp

from capibara_grpc import metrics
from capibara_grpc.chat.types import (
    REASONING_EFFORT,
    ROLES,
    Finished,
    Generated,
    Message,
    Reasoning,
    SamplingParams,
    Token,
)
from capibara_grpc.config import MeshConfig
from capibara_grpc.errors import InvalidArgument
from capibara_grpc.inference.admission import Admission
from capibara_grpc.inference.backends import ModelBackend, make_backend
from capibara_grpc.inference.types import ModelStatus
from capibara_grpc.upstream.client import Upstream

log = logging.getLogger(__name__)

MAX_TOKENS_LIMIT = 8192


def validate_params(params: SamplingParams) -> None:
    if params.max_tokens is not None and not 0 < params.max_tokens <= MAX_TOKENS_LIMIT:
        raise InvalidArgument(f"max_tokens must be between 1 and {MAX_TOKENS_LIMIT}, got {params.max_tokens}")
    if params.temperature is not None and not 0.0 <= params.temperature <= 5.0:
        raise InvalidArgument(f"temperature must be between 0 and 5, got {params.temperature}")
    if params.top_p is not None and not 0.0 < params.top_p <= 1.0:
        raise InvalidArgument(f"top_p must be in (0, 1], got {params.top_p}")
    if params.repeat_penalty is not None and not 0.0 < params.repeat_penalty <= 5.0:
        raise InvalidArgument(f"repeat_penalty must be in (0, 5], got {params.repeat_penalty}")
    if params.top_k is not None and params.top_k < 0:
        raise InvalidArgument(f"top_k must not be negative, got {params.top_k}")
    if len(params.stop) > 8 or any(not s for s in params.stop):
        raise InvalidArgument("stop takes at most 8 non-empty strings")
    if params.reasoning_effort and not REASONING_EFFORT.match(params.reasoning_effort):
        raise InvalidArgument(
            f"reasoning_effort must be a word such as low, medium or high, got '{params.reasoning_effort[:40]}'"
        )
    if params.json_schema:
        try:
            schema = json.loads(params.json_schema)
        except ValueError as exc:
            raise InvalidArgument(f"json_schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise InvalidArgument("json_schema must be a JSON object (a JSON Schema)")


class InferenceEngine:
    """All configured models, each behind its backend client."""

    def __init__(self, config: MeshConfig, health_interval_s: float = 2.0):
        self.config = config
        self.health_interval_s = health_interval_s
        self._session: aiohttp.ClientSession | None = None
        self.backends: dict[str, ModelBackend] = {}
        self.admission: dict[str, Admission] = {}
        self.last_status: dict[str, ModelStatus] = {}
        self._watchers: list[Callable[[dict[str, ModelStatus]], Awaitable[None]]] = []
        self._health_task: asyncio.Task | None = None

    async def start(self) -> None:
        # No total timeout: a generation lasts as long as the caller's deadline allows.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=64)
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        self.backends = {
            mid: make_backend(model, Upstream(self.config, mid, self._session))
            for mid, model in self.config.models.items()
        }
        self.admission = {
            mid: Admission(mid, model.slots, model.max_queued) for mid, model in self.config.models.items()
        }
        await self.refresh_health()
        self._health_task = asyncio.create_task(self._watch_health())

    async def stop(self) -> None:
        if self._health_task:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        if self._session:
            await self._session.close()

    def on_health_change(self, callback: Callable[[dict[str, ModelStatus]], Awaitable[None]]) -> None:
        """Register an async callback run after every health probe (register before start)."""
        self._watchers.append(callback)

    async def refresh_health(self) -> dict[str, ModelStatus]:
        statuses = await asyncio.gather(*(backend.status() for backend in self.backends.values()))
        self.last_status = {status.model_id: status for status in statuses}
        for callback in self._watchers:
            await callback(self.last_status)
        return self.last_status

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.refresh_health()
            except Exception:  # noqa: BLE001 - a health probe must never kill the service
                log.exception("health refresh failed")

    def backend(self, model_id: str) -> ModelBackend:
        if not model_id:
            raise InvalidArgument("model_id is required")
        self.config.model(model_id)
        return self.backends[model_id]

    async def generate(
        self, model_id: str, messages: list[Message], params: SamplingParams
    ) -> AsyncIterator[Generated]:
        backend = self.backend(model_id)
        if not messages:
            raise InvalidArgument("messages must not be empty")
        for message in messages:
            if message.role not in ROLES:
                raise InvalidArgument(f"message role must be one of {', '.join(ROLES)}")
        if not any(m.role == "user" and m.content.strip() for m in messages):
            raise InvalidArgument("messages need at least one non-empty user message")
        validate_params(params)
        async with self.admission[model_id].slot():
            started, first_token, first_reasoning = time.perf_counter(), True, True
            async for item in backend.generate(messages, params):
                # Time to first token is the answer's; a reasoning model's thinking has its own.
                if first_token and isinstance(item, Token):
                    metrics.TIME_TO_FIRST_TOKEN.labels(model_id).observe(time.perf_counter() - started)
                    first_token = False
                elif first_reasoning and isinstance(item, Reasoning):
                    metrics.TIME_TO_FIRST_REASONING.labels(model_id).observe(time.perf_counter() - started)
                    first_reasoning = False
                elif isinstance(item, Finished):
                    metrics.GENERATED_TOKENS.labels(model_id).inc(item.completion_tokens)
                    if item.tokens_per_second:
                        metrics.TOKENS_PER_SECOND.labels(model_id).observe(item.tokens_per_second)
                yield item

    async def list_models(self) -> list[ModelStatus]:
        statuses = await self.refresh_health()
        return [statuses[mid] for mid in sorted(statuses)]
