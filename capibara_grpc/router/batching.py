"""Micro-batching: concurrent calls collected into one call of an async function.

The router scores concurrent queries in one call: one numpy pass over all of them on the event
loop, and one encoder forward pass, in a worker thread, for those that need their meaning.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Result = TypeVar("Result")


class MicroBatcher(Generic[Result]):
    """Collects concurrent `submit` calls into one awaited call of `work(batch)`.

    A batch waits at most `wait_ms` for more items, and only while other calls are known to be
    coming (more submitted than collected), so a lone request never waits."""

    def __init__(
        self, work: Callable[[list[str]], Awaitable[Sequence[Result]]], batch_max: int = 32, wait_ms: float = 2.0
    ):
        self.work = work
        self.batch_max = batch_max
        self.wait_s = wait_ms / 1000
        self._queue: asyncio.Queue[tuple[str, asyncio.Future]] = asyncio.Queue()
        self._worker: asyncio.Task | None = None
        self._submitted = 0
        self.batches = 0

    async def submit(self, text: str) -> Result:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            # A queue and a worker belong to one event loop; start afresh in a new one.
            self._queue = asyncio.Queue()
            self._submitted = 0
            self._worker = loop.create_task(self._run())
        future = loop.create_future()
        self._submitted += 1
        self._queue.put_nowait((text, future))
        return await future

    async def close(self) -> None:
        if self._worker:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        collected = 0
        while True:
            batch = [await self._queue.get()]
            collected += 1
            deadline = loop.time() + self.wait_s
            while len(batch) < self.batch_max:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    collected += 1
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0 or self._submitted == collected:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                    collected += 1
                except TimeoutError:
                    break
            live = [(text, future) for text, future in batch if not future.cancelled()]
            if not live:
                continue
            self.batches += 1
            try:
                results = await self.work([text for text, _ in live])
            except Exception as exc:  # noqa: BLE001 - hand the failure to every waiting caller
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(live, results, strict=True):
                if not future.done():
                    future.set_result(result)
