"""The live status of the mesh behind GET /api/status and the /status page. No gRPC in here.

Two kinds of figures:
- what the gateway saw of each chat (`ChatStats`): requests, errors, failovers, time to first
  token, tokens/s, routing, cache hits, in per-minute buckets over the last `window_minutes`;
- what a sampler sees every few seconds (`MeshStatus.sample`, fed by status_probes.py): the health
  of every service and model with the time it last changed, the inference service's queue depth
  and active generations (and, for a model with replicas it balances, each server's), and the
  resident memory of the mesh's processes on this host.

`MeshStatus.snapshot()` is plain data with the field names of capibara.gateway.v1.GetStatusResponse
(whose comments document each figure).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

from capibara_gateway.events import ChatDone, ChatEvent, RoutingDecision
from capibara_gateway.health import HealthReport
from capibara_grpc.chat.types import Token
from capibara_grpc.errors import StreamError, code_name
from capibara_grpc.health_names import model_health_name

WINDOW_MINUTES = 15
# Time to first token samples kept per model and minute (a busier minute keeps its first ones).
MAX_TTFT_SAMPLES = 2000
# Sampled gauges (queue, memory) kept: 15 minutes at one sample every 2 s.
MAX_SAMPLES = 450
# A client that went away is not a failure of the mesh.
NOT_ERRORS = frozenset({"CANCELLED"})


@dataclass
class ChatOutcome:
    """What the gateway saw of one chat."""

    model_id: str = ""  # the model that answered (or was asked for, when routing failed)
    route_name: str = ""
    confidence: float = 0.0
    source: str = ""  # request, router, default or consensus
    fallback: bool = False
    failed_models: list[str] = field(default_factory=list)
    ttft_s: float | None = None  # chat start -> first token event, as the gateway saw it
    generation_s: float = 0.0  # the backend's generation time (first token -> last)
    completion_tokens: int = 0
    cache_hit: str = ""
    error: str = ""  # gRPC status name of a failed chat


def _percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


@dataclass
class _ModelMinute:
    requests: int = 0
    errors: int = 0
    failovers: int = 0
    cache_hits: int = 0
    completion_tokens: int = 0
    generation_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)

    def add(self, other: _ModelMinute) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.failovers += other.failovers
        self.cache_hits += other.cache_hits
        self.completion_tokens += other.completion_tokens
        self.generation_s += other.generation_s
        self.ttft_s.extend(other.ttft_s)

    def figures(self) -> dict:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "failovers": self.failovers,
            "cache_hits": self.cache_hits,
            "completion_tokens": self.completion_tokens,
            "ttft_p50_ms": round(_percentile(self.ttft_s, 0.5) * 1000, 1),
            "ttft_p95_ms": round(_percentile(self.ttft_s, 0.95) * 1000, 1),
            "tokens_per_second": round(self.completion_tokens / self.generation_s, 2) if self.generation_s else 0.0,
        }


@dataclass
class _RouteMinute:
    requests: int = 0
    confidence_sum: float = 0.0
    fallbacks: int = 0


class ChatStats:
    """Per-minute buckets of the chats the gateway answered, for the last `window_minutes`."""

    def __init__(self, window_minutes: int = WINDOW_MINUTES, clock: Callable[[], float] = time.time):
        self.window_minutes = window_minutes
        self.clock = clock
        self._models: dict[int, dict[str, _ModelMinute]] = {}
        self._routes: dict[int, dict[str, _RouteMinute]] = {}
        self._sources: dict[int, collections.Counter] = {}
        self._pruned_minute: int | None = None

    def _minute(self) -> int:
        """The current minute bucket; the expired ones are dropped when it changes (they can only
        expire then), not on every chat."""
        minute = int(self.clock() // 60)
        if minute != self._pruned_minute:
            self._pruned_minute = minute
            for buckets in (self._models, self._routes, self._sources):
                for old in [m for m in buckets if m <= minute - self.window_minutes]:
                    del buckets[old]
        return minute

    def record(self, outcome: ChatOutcome) -> None:
        minute = self._minute()
        models = self._models.setdefault(minute, {})
        bucket = models.setdefault(outcome.model_id, _ModelMinute())
        bucket.requests += 1
        if outcome.error and outcome.error not in NOT_ERRORS:
            bucket.errors += 1
        for failed in outcome.failed_models:
            models.setdefault(failed, _ModelMinute()).failovers += 1
        if outcome.cache_hit:
            bucket.cache_hits += 1
        elif not outcome.error:
            # Replayed answers say nothing about a model's speed.
            bucket.completion_tokens += outcome.completion_tokens
            bucket.generation_s += outcome.generation_s
            if outcome.ttft_s is not None and len(bucket.ttft_s) < MAX_TTFT_SAMPLES:
                bucket.ttft_s.append(outcome.ttft_s)
        if outcome.route_name:
            route = self._routes.setdefault(minute, {}).setdefault(outcome.route_name, _RouteMinute())
            route.requests += 1
            route.confidence_sum += outcome.confidence
            route.fallbacks += outcome.fallback
        if outcome.source:
            self._sources.setdefault(minute, collections.Counter())[outcome.source] += 1

    async def observe(self, events: AsyncIterator[ChatEvent], requested_model: str = "") -> AsyncIterator[ChatEvent]:
        """`events` passed on unchanged; the chat is recorded once they end, fail or are closed."""
        started = time.perf_counter()
        outcome = ChatOutcome(model_id=requested_model)
        try:
            async for event in events:
                if isinstance(event, RoutingDecision):
                    outcome.model_id, outcome.route_name = event.model_id, event.route_name
                    outcome.confidence, outcome.source, outcome.fallback = (
                        event.confidence,
                        event.source,
                        event.fallback,
                    )
                    outcome.failed_models = list(event.failed_models)
                elif isinstance(event, Token) and outcome.ttft_s is None:
                    outcome.ttft_s = time.perf_counter() - started
                elif isinstance(event, ChatDone):
                    finished = event.finished
                    outcome.model_id = finished.model_id or outcome.model_id
                    outcome.completion_tokens = finished.completion_tokens
                    outcome.generation_s = finished.generation_ms / 1000
                    outcome.cache_hit = finished.cache_hit
                elif isinstance(event, StreamError) and not outcome.error:
                    outcome.error = event.code
                yield event
        except GeneratorExit:
            if not outcome.completion_tokens and not outcome.error:
                outcome.error = "CANCELLED"
            raise
        except BaseException as exc:
            # A client that went away while the chat waited (asyncio.CancelledError) is CANCELLED,
            # which NOT_ERRORS leaves out of the errors.
            outcome.error = code_name(exc)
            raise
        finally:
            self.record(outcome)

    def _window(self, now_minute: int) -> list[int]:
        return list(range(now_minute - self.window_minutes + 1, now_minute + 1))

    def models(self, model_ids: Iterable[str]) -> dict[str, dict]:
        """Per model: the window's figures and `minutes`, one point per minute, oldest first."""
        window = self._window(self._minute())
        result = {}
        for model_id in model_ids:
            total = _ModelMinute()
            minutes = []
            for minute in window:
                bucket = self._models.get(minute, {}).get(model_id, _ModelMinute())
                total.add(bucket)
                point = bucket.figures()
                minutes.append({"start": minute * 60, **{k: point[k] for k in _MINUTE_FIELDS}})
            result[model_id] = {**total.figures(), "minutes": minutes}
        return result

    def unattributed_errors(self, model_ids: Iterable[str]) -> int:
        """Failed chats that named no configured model (they failed before routing decided)."""
        known = set(model_ids)
        return sum(b.errors for m in self._models.values() for name, b in m.items() if name not in known)

    def routes(self) -> list[dict]:
        totals: dict[str, _RouteMinute] = {}
        self._minute()
        for minute in self._routes.values():
            for name, bucket in minute.items():
                total = totals.setdefault(name, _RouteMinute())
                total.requests += bucket.requests
                total.confidence_sum += bucket.confidence_sum
                total.fallbacks += bucket.fallbacks
        return [
            {
                "route_name": name,
                "requests": t.requests,
                "mean_confidence": round(t.confidence_sum / t.requests, 3),
                "fallbacks": t.fallbacks,
            }
            for name, t in sorted(totals.items(), key=lambda item: -item[1].requests)
        ]

    def sources(self) -> dict[str, int]:
        self._minute()
        return dict(sum(self._sources.values(), collections.Counter()))


_MINUTE_FIELDS = ("requests", "errors", "ttft_p95_ms", "tokens_per_second")


class HealthSince:
    """Each health entry's status and when it took that status (first seen, or last changed)."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._entries: dict[str, tuple[str, str, float]] = {}

    def update(self, name: str, status: str, detail: str = "") -> None:
        previous = self._entries.get(name)
        since = previous[2] if previous and previous[0] == status else self.clock()
        self._entries[name] = (status, detail, since)

    def get(self, name: str) -> dict:
        status, detail, since = self._entries.get(name, ("UNKNOWN", "not checked yet", 0.0))
        return {"status": status, "detail": detail, "since": since}


@dataclass
class Sample:
    """One sampler tick: inference load per model and memory per process (None: not probed)."""

    load: dict[str, tuple[float, float]] | None = None  # model -> (queue depth, active generations)
    memory: dict[str, tuple[int, float]] | None = None  # process name -> (pid, RSS MiB)
    # model -> {"replicas": [...], "last_replica": {...}} (status_probes.parse_replicas)
    replicas: dict[str, dict] | None = None


class MeshStatus:
    def __init__(self, model_ids: list[str], services: dict[str, str], clock: Callable[[], float] = time.time):
        """`services`: short name -> grpc.health.v1 name of each deployed service."""
        self.model_ids = model_ids
        self.services = services
        self.clock = clock
        self.chats = ChatStats(clock=clock)
        self.health = HealthSince(clock)
        self.verdict = HealthSince(clock)
        self.down: list[str] = []
        self._load: collections.deque = collections.deque(maxlen=MAX_SAMPLES)
        self._memory: collections.deque = collections.deque(maxlen=MAX_SAMPLES)
        self._replicas: dict[str, dict] = {}

    def record_health(self, report: HealthReport) -> None:
        for entry in report.services:
            self.health.update(entry.service, entry.status, entry.detail)
        verdict = report.verdict
        self.verdict.update("mesh", verdict.status, verdict.reason)
        self.down = verdict.down

    def record_unreachable(self, why: str) -> None:
        """The health check itself failed: nothing is known, say so rather than keep old news."""
        self.verdict.update("mesh", "UNKNOWN", why)

    def record_sample(self, sample: Sample) -> None:
        now = self.clock()
        if sample.load is not None:
            self._load.append((now, sample.load))
        if sample.memory is not None:
            self._memory.append((now, sample.memory))
        if sample.replicas is not None:
            self._replicas = sample.replicas

    def _models(self, figures: dict[str, dict]) -> list[dict]:
        """`figures`: self.chats.models(self.model_ids), computed once by snapshot()."""
        latest = self._load[-1][1] if self._load else {}
        models = []
        for model_id in self.model_ids:
            queue, active = latest.get(model_id, (0.0, 0.0))
            # A model the inference service has not admitted anything for yet has no gauge: zero.
            load = [
                {
                    "at": at,
                    "queue_depth": s.get(model_id, (0.0, 0.0))[0],
                    "active_generations": s.get(model_id, (0.0, 0.0))[1],
                }
                for at, s in self._load
            ]
            models.append(
                {
                    "model_id": model_id,
                    **self.health.get(model_health_name(model_id)),
                    **figures[model_id],
                    "queue_depth": queue,
                    "active_generations": active,
                    "load": load,
                    **self._replicas.get(model_id, {}),
                }
            )
        return models

    def _processes(self) -> list[dict]:
        if not self._memory:
            return []
        latest = self._memory[-1][1]
        return [
            {
                "name": name,
                "pid": pid,
                "rss_mib": rss,
                "history": [{"at": at, "rss_mib": s[name][1]} for at, s in self._memory if name in s],
            }
            for name, (pid, rss) in sorted(latest.items())
        ]

    def snapshot(self, keys: list[dict] | None = None, key_calls: list[dict] | None = None) -> dict:
        """Everything the status page shows, as GetStatusResponse's JSON (proto field names)."""
        figures = self.chats.models(self.model_ids)
        answered = sum(f["requests"] - f["errors"] for f in figures.values())
        hits = sum(f["cache_hits"] for f in figures.values())
        verdict = self.verdict.get("mesh")
        return {
            "status": verdict["status"],
            "since": verdict["since"],
            "down": self.down,
            "generated_at": self.clock(),
            "window_s": self.chats.window_minutes * 60,
            "services": [{"name": short, **self.health.get(full)} for short, full in self.services.items()],
            "models": self._models(figures),
            "routes": self.chats.routes(),
            "routing_sources": self.chats.sources(),
            "cache": {"hits": hits, "answered": answered, "hit_rate": round(hits / answered, 3) if answered else 0.0},
            "unattributed_errors": self.chats.unattributed_errors(self.model_ids),
            "processes": self._processes(),
            "keys": keys or [],
            "key_calls": key_calls or [],
        }
