"""Response cache in front of inference: exact and semantic hits, replayed as normal streams.

Key: the model, its sampling parameters and the enriched messages (system prompt with whatever
context was added, conversation history, the question), so a cached answer is only reused for
exactly the prompt it answered. A semantic hit also needs the same model, parameters, route and
context; only the question may differ, by wording, never by content the answer depends on:
questions with digits, code or quoted text never match semantically, and only routes listed in
cache.semantic_routes (with their own similarity threshold) take part.

Only finished answers are stored. Requests with temperature > 0 bypass the cache unless
cache.cache_sampled is set. Storage is in-process (bounded LRU with TTL) or Redis, so several
gateway replicas share it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from capibara_grpc import metrics
from capibara_grpc.chat.types import Finished, Message, SamplingParams
from capibara_grpc.config import CacheConfig

# Content a semantic neighbour could get wrong: numbers ("1+1" vs "21+1"), code, quotations.
# An apostrophe inside a word ("what's") is not a quotation.
_NOT_SEMANTIC = re.compile(r"[0-9`{}\[\]();=<>\"«»“”„]|(^|\s)['‘]|['’](\s|$)")
# Semantic candidates kept per context (model, parameters, route, history); the oldest go first.
SEMANTIC_PER_CONTEXT = 512

Encode = Callable[[list[str]], Awaitable[np.ndarray]]


@dataclass
class CachedAnswer:
    tokens: list[str]
    finished: Finished


@dataclass
class CacheLookup:
    """What a request may read and write: its exact key, and its semantic slot if it has one."""

    key: str
    context_key: str | None = None
    embedding: list[float] | None = None


class CacheStore(Protocol):
    async def get(self, key: str) -> str | None: ...

    async def put(self, key: str, value: str, ttl_s: float) -> None: ...

    async def neighbours(self, context_key: str) -> list[tuple[list[float], str]]: ...

    async def add_neighbour(self, context_key: str, embedding: list[float], key: str, ttl_s: float) -> None: ...


class MemoryStore:
    """In-process: an LRU of at most `max_entries` answers, each expiring after its TTL."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._answers: collections.OrderedDict[str, tuple[float, str]] = collections.OrderedDict()
        self._neighbours: collections.OrderedDict[str, list[tuple[list[float], str]]] = collections.OrderedDict()

    async def get(self, key: str) -> str | None:
        entry = self._answers.get(key)
        if entry is None:
            return None
        expires, value = entry
        if time.monotonic() >= expires:
            del self._answers[key]
            return None
        self._answers.move_to_end(key)
        return value

    async def put(self, key: str, value: str, ttl_s: float) -> None:
        self._answers[key] = (time.monotonic() + ttl_s, value)
        self._answers.move_to_end(key)
        while len(self._answers) > self.max_entries:
            self._answers.popitem(last=False)

    async def neighbours(self, context_key: str) -> list[tuple[list[float], str]]:
        return list(self._neighbours.get(context_key, []))

    async def add_neighbour(self, context_key: str, embedding: list[float], key: str, ttl_s: float) -> None:
        entries = self._neighbours.pop(context_key, [])
        self._neighbours[context_key] = (entries + [(embedding, key)])[-SEMANTIC_PER_CONTEXT:]
        while len(self._neighbours) > self.max_entries:
            self._neighbours.popitem(last=False)


class RedisStore:
    """Shared by gateway replicas. Answers are strings with a TTL; each context's semantic
    candidates are a capped list (expired answers simply miss when fetched)."""

    def __init__(self, url: str, prefix: str = "capibara:cache:"):
        import redis.asyncio

        self.redis = redis.asyncio.from_url(url)
        self.prefix = prefix

    async def get(self, key: str) -> str | None:
        value = await self.redis.get(self.prefix + key)
        return value.decode() if value is not None else None

    async def put(self, key: str, value: str, ttl_s: float) -> None:
        await self.redis.set(self.prefix + key, value, px=int(ttl_s * 1000))

    async def neighbours(self, context_key: str) -> list[tuple[list[float], str]]:
        raw = await self.redis.lrange(self.prefix + "ctx:" + context_key, 0, -1)
        return [tuple(json.loads(item)) for item in raw]

    async def add_neighbour(self, context_key: str, embedding: list[float], key: str, ttl_s: float) -> None:
        name = self.prefix + "ctx:" + context_key
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(name, json.dumps([embedding, key]))
            pipe.ltrim(name, -SEMANTIC_PER_CONTEXT, -1)
            pipe.pexpire(name, int(ttl_s * 1000))
            await pipe.execute()

    async def close(self) -> None:
        await self.redis.aclose()


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False, sort_keys=True, default=str).encode()).hexdigest()


class ResponseCache:
    def __init__(self, settings: CacheConfig, store: CacheStore, encode: Encode | None = None):
        self.settings = settings
        self.store = store
        # (texts) -> unit-normalised embeddings; None = no semantic hits.
        self.encode = encode

    def semantic_threshold(self, route: str, question: str) -> float | None:
        threshold = self.settings.semantic_routes.get(route)
        if threshold is None or self.encode is None or _NOT_SEMANTIC.search(question):
            return None
        return threshold

    async def lookup(
        self, model_id: str, params: SamplingParams, messages: list[Message], route: str
    ) -> tuple[CachedAnswer | None, CacheLookup]:
        """The cached answer for this prompt (exact, else semantic), and how to store a new one.
        `params` are the resolved ones (the model's defaults filled in): what the model is asked."""
        parameters = dataclasses.asdict(params)
        lookup = CacheLookup(_digest(model_id, parameters, [dataclasses.asdict(m) for m in messages]))
        if (hit := await self._answer(lookup.key)) is not None:
            metrics.CACHE_REQUESTS.labels("exact_hit", route).inc()
            return dataclasses.replace(hit, finished=dataclasses.replace(hit.finished, cache_hit="exact")), lookup
        question = messages[-1].content
        # With tools, a neighbour's answer could call a tool with other arguments: exact hits only.
        threshold = None if params.tools else self.semantic_threshold(route, question)
        if threshold is not None:
            context = [dataclasses.asdict(m) for m in messages[:-1]]
            lookup.context_key = _digest(model_id, parameters, route, context)
            (vector,) = await self.encode([question])
            lookup.embedding = [round(float(x), 6) for x in vector]
            best_key, best = None, threshold
            for embedding, key in await self.store.neighbours(lookup.context_key):
                similarity = float(np.dot(vector, np.asarray(embedding, dtype=np.float32)))
                if similarity >= best:
                    best_key, best = key, similarity
            if best_key is not None and (hit := await self._answer(best_key)) is not None:
                metrics.CACHE_REQUESTS.labels("semantic_hit", route).inc()
                return dataclasses.replace(
                    hit, finished=dataclasses.replace(hit.finished, cache_hit="semantic")
                ), lookup
        metrics.CACHE_REQUESTS.labels("miss", route).inc()
        return None, lookup

    async def store_answer(self, lookup: CacheLookup, tokens: list[str], finished: Finished) -> None:
        if sum(len(t) for t in tokens) > self.settings.max_answer_chars:
            return
        value = json.dumps({"tokens": tokens, "finished": dataclasses.asdict(finished)}, ensure_ascii=False)
        await self.store.put(lookup.key, value, self.settings.ttl_s)
        if lookup.context_key and lookup.embedding is not None:
            await self.store.add_neighbour(lookup.context_key, lookup.embedding, lookup.key, self.settings.ttl_s)

    async def _answer(self, key: str) -> CachedAnswer | None:
        raw = await self.store.get(key)
        if raw is None:
            return None
        entry = json.loads(raw)
        return CachedAnswer(entry["tokens"], Finished(**entry["finished"]))


def encoder_for(settings_encoder: str, cache_size: int) -> Encode:
    """The router's sentence encoder, off the event loop."""
    from capibara_grpc.sentence_encoder import shared_encoder

    encoder = shared_encoder(settings_encoder, cache_size)

    async def encode(texts: list[str]) -> np.ndarray:
        return await asyncio.to_thread(encoder.encode, texts)

    return encode
