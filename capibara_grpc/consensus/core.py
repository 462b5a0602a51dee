"""Consensus core: ask several models (or one model several times) and combine the answers.

Strategies:
- vote: group answers by meaning (sentence embeddings); the most central answer of the largest
  group wins; agreement = that group's share of the answers.
- weighted: the same groups, weighed by per-model weights.
- judge: a judge model sees the numbered candidates and names the best; an unparseable reply
  falls back to vote and says so.
- fuse: an aggregator model writes one answer from the candidates (streamed as tokens).
- self_consistency: one model sampled k times at temperature > 0; majority over normalized final
  answers, numbers compared as numbers.
No gRPC in here: `generate` is the inference client's (or any) token stream.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np

from capibara_grpc.chat.request import resolve, validate_message
from capibara_grpc.chat.types import (
    Finished,
    GenerateFn,
    Message,
    SamplingParams,
    Token,
)
from capibara_grpc.config import MeshConfig
from capibara_grpc.errors import InvalidArgument, StreamError, to_mesh_error
from capibara_grpc.text import normalize

STRATEGIES = ("vote", "weighted", "judge", "fuse", "self_consistency")
MAX_CANDIDATES = 8
Encode = Callable[[list[str]], np.ndarray]


@dataclass
class Request:
    prompt: str
    models: list[str] = field(default_factory=list)
    strategy: str = "vote"
    quorum: int = 0
    per_model_timeout_s: float = 0.0
    params: SamplingParams = field(default_factory=SamplingParams)
    samples: int = 0


@dataclass
class Started:
    model_id: str


@dataclass
class CandidateDone:
    model_id: str
    text: str
    latency_ms: float
    prompt_tokens: int
    completion_tokens: int


@dataclass
class CandidateFailed:
    """One candidate failed; the run goes on with the others (not a StreamError, which ends the
    stream: this one names the candidate and is followed by more events)."""

    model_id: str
    code: str
    message: str


@dataclass
class Final:
    text: str
    strategy: str
    agreement: float
    scores: list[tuple[str, float]]
    chosen_model_id: str
    reasoning: str


# The run's last event when it fails after it started (quorum not met, combining failed): StreamError.
Event = Started | CandidateDone | CandidateFailed | Token | Final | StreamError


def final_answer_key(text: str) -> str:
    """What self-consistency compares: the last number in the answer (as a number), else the
    answer's normalized text."""
    numbers = re.findall(r"-?\d+(?:[.,]\d+)?", text.replace("\u2212", "-"))
    if numbers:
        value = float(numbers[-1].replace(",", "."))
        return f"{value:g}"
    return normalize(text)


class ConsensusEngine:
    def __init__(self, config: MeshConfig, generate: GenerateFn, encode: Encode):
        self.config = config
        self.settings = config.consensus
        self.generate = generate
        self.encode = encode

    # -- validation ------------------------------------------------------------------------

    def _plan(self, request: Request) -> list[tuple[str, str, SamplingParams]]:
        """(candidate label, model id, params) per candidate, after validating the request."""
        validate_message(request.prompt, self.config.gateway.max_message_bytes, "prompt")
        if request.strategy not in STRATEGIES:
            raise InvalidArgument(f"unknown strategy '{request.strategy}' (one of {', '.join(STRATEGIES)})")
        models = request.models or sorted(self.config.models)
        for model_id in models:
            self.config.model(model_id)
        if request.strategy == "self_consistency":
            k = request.samples or self.settings.default_samples
            if k < 2 or k > MAX_CANDIDATES:
                raise InvalidArgument(f"self_consistency needs between 2 and {MAX_CANDIDATES} samples, got {k}")
            temperature = request.params.temperature if request.params.temperature else 0.8
            base_seed = request.params.seed if request.params.seed is not None else 1234
            return [
                (
                    f"{models[0]}#{i + 1}",
                    models[0],
                    SamplingParams(**{**request.params.__dict__, "temperature": temperature, "seed": base_seed + i}),
                )
                for i in range(k)
            ]
        if len(models) > MAX_CANDIDATES:
            raise InvalidArgument(f"at most {MAX_CANDIDATES} models, got {len(models)}")
        return [(m, m, request.params) for m in models]

    def _quorum(self, request: Request, candidates: int) -> int:
        quorum = request.quorum or candidates // 2 + 1
        if quorum > candidates:
            raise InvalidArgument(f"quorum {quorum} is larger than the number of candidates ({candidates})")
        if quorum < 1:
            raise InvalidArgument("quorum must be at least 1")
        return quorum

    # -- running candidates ----------------------------------------------------------------

    async def _stream(self, model_id: str, messages: list[Message], params: SamplingParams, timeout_s: float):
        """One generation with the model's defaults filled in, bounded by `timeout_s`; its upstream
        call is closed however it ends."""
        params = resolve(params, self.config.models[model_id].defaults)
        async with asyncio.timeout(timeout_s):
            stream = self.generate(model_id, messages, params, timeout_s)
            try:
                async for item in stream:
                    yield item
            finally:
                await stream.aclose()

    async def _collect(self, model_id: str, messages: list[Message], params: SamplingParams, timeout_s: float):
        started = time.perf_counter()
        parts, finished = [], None
        async for item in self._stream(model_id, messages, params, timeout_s):
            if isinstance(item, Token):
                parts.append(item.text)
            elif isinstance(item, Finished):
                finished = item
        return "".join(parts), (time.perf_counter() - started) * 1000, finished

    async def combine(self, request: Request, deadline_s: float) -> AsyncIterator[Event]:
        plan = self._plan(request)
        quorum = self._quorum(request, len(plan))
        deadline = time.monotonic() + deadline_s
        per_model = request.per_model_timeout_s or deadline_s
        messages = [Message("user", request.prompt)]
        queue: asyncio.Queue = asyncio.Queue()

        async def run(label: str, model_id: str, params: SamplingParams):
            try:
                timeout = max(0.01, min(per_model, deadline - time.monotonic()))
                text, latency, finished = await self._collect(model_id, messages, params, timeout)
                await queue.put(
                    CandidateDone(
                        label,
                        text,
                        latency,
                        finished.prompt_tokens if finished else 0,
                        finished.completion_tokens if finished else 0,
                    )
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one candidate failing is an event, not a crash
                error = to_mesh_error(exc, f"candidate {label}")
                await queue.put(CandidateFailed(label, error.code.name, error.message))

        tasks = []
        try:
            for label, model_id, params in plan:
                yield Started(label)
                tasks.append(asyncio.create_task(run(label, model_id, params)))
            done: list[CandidateDone] = []
            failed: list[CandidateFailed] = []
            for _ in plan:
                event = await queue.get()
                (done if isinstance(event, CandidateDone) else failed).append(event)
                yield event
            if len(done) < quorum:
                yield StreamError(
                    "UNAVAILABLE",
                    f"quorum not met: {len(done)} of {len(plan)} candidates answered, "
                    f"{quorum} needed; failed: " + ", ".join(f"{f.model_id} ({f.code}: {f.message})" for f in failed),
                )
                return
            async for event in self._decide(request, done, deadline):
                yield event
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- combining -------------------------------------------------------------------------

    def _groups(self, texts: list[str]) -> tuple[list[list[int]], np.ndarray]:
        vectors = self.encode([t if t.strip() else "(empty answer)" for t in texts])
        similarity = vectors @ vectors.T
        threshold = self.settings.same_answer_similarity
        groups: list[list[int]] = []
        for i in range(len(texts)):  # connected components of "similar enough"
            linked = [g for g in groups if any(similarity[i, j] >= threshold for j in g)]
            merged = [i] + [j for g in linked for j in g]
            groups = [g for g in groups if g not in linked] + [sorted(merged)]
        return groups, similarity

    def _vote(self, done: list[CandidateDone], weights: dict[str, float] | None = None) -> Final:
        groups, similarity = self._groups([c.text for c in done])

        def weight(i: int) -> float:
            return 1.0 if weights is None else weights.get(done[i].model_id.split("#")[0], 0.5)

        total = sum(weight(i) for i in range(len(done)))
        best = max(groups, key=lambda g: (sum(weight(i) for i in g), similarity[np.ix_(g, g)].mean()))
        central = max(best, key=lambda i: similarity[i, best].mean())
        scores = [(c.model_id, float(similarity[i].mean())) for i, c in enumerate(done)]
        agreement = sum(weight(i) for i in best) / total
        strategy = "vote" if weights is None else "weighted"
        reasoning = (
            f"{len(best)} of {len(done)} answers agree (groups: {[len(g) for g in groups]}); "
            f"the most central answer of the largest group is {done[central].model_id}'s"
        )
        return Final(done[central].text, strategy, agreement, scores, done[central].model_id, reasoning)

    def _self_consistency(self, done: list[CandidateDone]) -> Final:
        keys = [final_answer_key(c.text) for c in done]
        counts = {k: keys.count(k) for k in keys}
        winner = max(counts, key=lambda k: (counts[k], -keys.index(k)))
        chosen = keys.index(winner)
        scores = [(c.model_id, counts[k] / len(keys)) for c, k in zip(done, keys, strict=True)]
        return Final(
            done[chosen].text,
            "self_consistency",
            counts[winner] / len(keys),
            scores,
            done[chosen].model_id,
            f"final answer '{winner}' in {counts[winner]} of {len(keys)} samples",
        )

    def _aux_model(self, configured: str) -> str:
        return configured or self.config.gateway.default_model

    async def _judge(self, request: Request, done: list[CandidateDone], deadline: float) -> Final:
        judge = self._aux_model(self.settings.judge_model)
        listing = "\n\n".join(f"Answer {i + 1}:\n{c.text.strip()}" for i, c in enumerate(done))
        prompt = (
            f"Question:\n{request.prompt}\n\n{listing}\n\nWhich answer is best? Reply exactly in the form\n"
            f"BEST: <number from 1 to {len(done)}>\nREASON: <one sentence>"
        )
        text, _, _ = await self._collect(
            judge,
            [Message("user", prompt)],
            SamplingParams(max_tokens=60, temperature=0),
            max(0.01, deadline - time.monotonic()),
        )
        match = re.search(r"BEST\s*:?\s*(?:answer\s*)?#?(\d+)", text, re.IGNORECASE)
        pick = int(match.group(1)) - 1 if match else -1
        if not 0 <= pick < len(done):
            fallback = self._vote(done)
            fallback.strategy = "judge"
            fallback.reasoning = (
                f"judge {judge} gave no usable pick ({text.strip()[:120]!r}); fell back to vote: {fallback.reasoning}"
            )
            return fallback
        reason = re.search(r"REASON\s*:?\s*(.+)", text, re.IGNORECASE | re.DOTALL)
        scores = [(c.model_id, 1.0 if i == pick else 0.0) for i, c in enumerate(done)]
        agreement = self._vote(done).agreement
        return Final(
            done[pick].text,
            "judge",
            agreement,
            scores,
            done[pick].model_id,
            f"judge {judge} picked answer {pick + 1}: "
            + (reason.group(1).strip()[:300] if reason else "(no reason given)"),
        )

    async def _fuse(self, request: Request, done: list[CandidateDone], deadline: float) -> AsyncIterator[Event]:
        aggregator = self._aux_model(self.settings.aggregator_model)
        listing = "\n\n".join(f"Answer {i + 1} ({c.model_id}):\n{c.text.strip()}" for i, c in enumerate(done))
        prompt = (
            f"Several assistants answered this question:\n{request.prompt}\n\n{listing}\n\n"
            "Write one answer that combines what is correct in them, in the language of the question."
        )
        parts = []
        timeout = max(0.01, deadline - time.monotonic())
        async for item in self._stream(aggregator, [Message("user", prompt)], request.params, timeout):
            if isinstance(item, Token):
                parts.append(item.text)
                yield item
        fused = "".join(parts)
        vectors = self.encode([fused or "(empty answer)"] + [c.text or "(empty answer)" for c in done])
        scores = [(c.model_id, float(vectors[0] @ vectors[i + 1])) for i, c in enumerate(done)]
        yield Final(
            fused,
            "fuse",
            self._vote(done).agreement,
            scores,
            aggregator,
            f"{aggregator} wrote one answer from {len(done)} candidates",
        )

    async def _decide(self, request: Request, done: list[CandidateDone], deadline: float) -> AsyncIterator[Event]:
        try:
            if request.strategy == "vote":
                yield self._vote(done)
            elif request.strategy == "weighted":
                yield self._vote(done, self.settings.weights)
            elif request.strategy == "self_consistency":
                yield self._self_consistency(done)
            elif request.strategy == "judge":
                yield await self._judge(request, done, deadline)
            else:
                async for event in self._fuse(request, done, deadline):
                    yield event
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
            yield StreamError.from_exception(exc, "combining", "combining failed: ")
