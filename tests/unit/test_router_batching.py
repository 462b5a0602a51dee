"""MicroBatcher: concurrent calls scored in one call of the blocking function, each caller
getting its own answer; a failing batch fails its own callers only; a caller that gives up
leaves the others their answers."""

from __future__ import annotations

import asyncio
import threading

import pytest

from capibara_grpc.router.batching import MicroBatcher


class Work:
    """Upper-cases each text, in a thread as the router's encoder runs; fails a batch that holds
    "boom"; can be held while a batch runs."""

    def __init__(self):
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.release.set()

    async def __call__(self, texts: list[str]) -> list[str]:
        self.batches.append(list(texts))
        return await asyncio.to_thread(self._blocking, texts)

    def _blocking(self, texts: list[str]) -> list[str]:
        self.release.wait(5)
        if "boom" in texts:
            raise RuntimeError("the batch failed")
        return [t.upper() for t in texts]


async def test_concurrent_calls_share_one_batch_and_get_their_own_results():
    work = Work()
    batcher = MicroBatcher(work, batch_max=32, wait_ms=50)
    try:
        texts = [f"query {i}" for i in range(10)]
        results = await asyncio.gather(*(batcher.submit(t) for t in texts))
        assert results == [t.upper() for t in texts]
        assert work.batches == [texts]
    finally:
        await batcher.close()


async def test_batches_are_at_most_batch_max():
    work = Work()
    batcher = MicroBatcher(work, batch_max=4, wait_ms=50)
    try:
        texts = [f"q{i}" for i in range(10)]
        assert await asyncio.gather(*(batcher.submit(t) for t in texts)) == [t.upper() for t in texts]
        assert [len(b) for b in work.batches] == [4, 4, 2]
    finally:
        await batcher.close()


async def test_a_failing_batch_fails_only_its_own_callers():
    work = Work()
    batcher = MicroBatcher(work, batch_max=2, wait_ms=50)
    try:
        results = await asyncio.gather(*(batcher.submit(t) for t in ["a", "boom", "c", "d"]), return_exceptions=True)
        assert [type(r) for r in results[:2]] == [RuntimeError, RuntimeError]
        assert results[2:] == ["C", "D"]
        assert await batcher.submit("later") == "LATER"  # the batcher goes on
    finally:
        await batcher.close()


async def test_a_cancelled_caller_leaves_the_others_their_results():
    work = Work()
    batcher = MicroBatcher(work, batch_max=32, wait_ms=50)
    try:
        work.release.clear()
        first = asyncio.create_task(batcher.submit("first"))  # its batch runs, held
        while not work.batches:
            await asyncio.sleep(0.005)
        waiting = [asyncio.create_task(batcher.submit(t)) for t in ("keep 1", "gone", "keep 2")]
        await asyncio.sleep(0.01)
        waiting[1].cancel()
        work.release.set()
        assert await first == "FIRST"
        assert await waiting[0] == "KEEP 1" and await waiting[2] == "KEEP 2"
        with pytest.raises(asyncio.CancelledError):
            await waiting[1]
        assert "gone" not in work.batches[-1]  # cancelled before its batch ran: not scored
    finally:
        await batcher.close()


async def test_a_lone_call_does_not_wait_for_company():
    work = Work()
    batcher = MicroBatcher(work, batch_max=32, wait_ms=5000)
    try:
        assert await asyncio.wait_for(batcher.submit("alone"), 2) == "ALONE"
    finally:
        await batcher.close()
