"""Admission in front of a model's backend: at most `slots` generations at once, a bounded queue
behind them, and RESOURCE_EXHAUSTED (429 over REST, with Retry-After) when the queue is full.

Without it, a burst piles up inside llama-server (or vLLM) where nobody can see or bound it, and
every caller's first token waits behind all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

from capibara_grpc import metrics
from capibara_grpc.errors import ResourceExhausted


class Admission:
    def __init__(self, model_id: str, slots: int, max_queued: int):
        self.model_id = model_id
        self.slots = slots
        self.max_queued = max_queued
        self.active = 0
        self.queued = 0
        self._semaphore = asyncio.Semaphore(slots)
        # Moving average of how long a generation holds its slot, for Retry-After.
        self._mean_hold_s = 2.0

    def retry_after_s(self) -> int:
        return max(1, math.ceil(self._mean_hold_s * (self.queued + 1) / self.slots))

    @contextlib.asynccontextmanager
    async def slot(self):
        if self._semaphore.locked() and self.queued >= self.max_queued:
            raise ResourceExhausted(
                f"model '{self.model_id}' is busy: {self.active} answers generating and {self.queued} waiting "
                f"(at most {self.max_queued}); retry in {self.retry_after_s()} s",
                self.retry_after_s(),
            )
        queue_depth, active = (
            metrics.QUEUE_DEPTH.labels(self.model_id),
            metrics.ACTIVE_GENERATIONS.labels(self.model_id),
        )
        self.queued += 1
        queue_depth.inc()
        try:
            await self._semaphore.acquire()
        finally:
            self.queued -= 1
            queue_depth.dec()
        self.active += 1
        active.inc()
        started = time.monotonic()
        try:
            yield
        finally:
            self.active -= 1
            active.dec()
            self._semaphore.release()
            self._mean_hold_s = 0.8 * self._mean_hold_s + 0.2 * (time.monotonic() - started)
