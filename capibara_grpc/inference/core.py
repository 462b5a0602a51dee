"""Inference core: picks the model's backend, admits the request to one of its slots, watches
backend health. A request straight from a client (not through the gateway or consensus, which
validated it) is validated and resolved here, with the same rules (capibara_grpc/chat/request.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp

from capibara_grpc import metrics
from capibara_grpc.chat.request import resolve, validate_messages, validate_params
from capibara_grpc.chat.types import Finished, Generated, Message, Reasoning, SamplingParams, Token
from capibara_grpc.config import MeshConfig
from capibara_grpc.errors import InvalidField
from capibara_grpc.inference.admission import Admission
from capibara_grpc.inference.backends import ModelBackend, make_backend
from capibara_grpc.inference.types import ModelStatus
from capibara_grpc.telemetry import genai, spans
from capibara_grpc.upstream.client import Upstream

log = logging.getLogger(__name__)


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
            raise InvalidField("model_id", "is required")
        self.config.model(model_id)
        return self.backends[model_id]

    async def generate(
        self, model_id: str, messages: list[Message], params: SamplingParams, validated: bool = False
    ) -> AsyncIterator[Generated]:
        """`validated`: an edge of the mesh checked the request and filled in the model's defaults
        already (the gateway, consensus); otherwise that is done here."""
        backend = self.backend(model_id)
        if not validated:
            validate_messages(messages)
            params = resolve(validate_params(params), backend.model.defaults)
        if params.tools and not backend.model.takes_tools:
            raise InvalidField("params.tools", f"model '{model_id}' does not take tools (models.{model_id}.tools)")
        async with self.admission[model_id].slot():
            started, first_token, first_reasoning = time.perf_counter(), True, True
            items = backend.generate(messages, params)
            if (parent := spans.current.get()) is not None and parent.recording and spans.TRACER:  # a sampled chat
                upstream = backend.upstream
                items = genai.traced(backend.model, upstream.model_name, upstream.address, messages, params, items)
            async for item in items:
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
