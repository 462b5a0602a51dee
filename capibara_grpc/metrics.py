"""Prometheus metrics of the mesh, and the /metrics endpoint each service serves.

Every metric is defined here, once; the services only call them. A process that hosts several
services exports them all on each service's metrics port (labels say which service).
"""

from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter(
    "capibara_grpc_requests_total", "gRPC calls handled, by method and status code", ["service", "method", "code"]
)
REQUEST_SECONDS = Histogram(
    "capibara_grpc_request_seconds",
    "Duration of gRPC calls (whole stream for streams)",
    ["service", "method", "code"],
    buckets=_LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "capibara_time_to_first_token_seconds",
    "From a generation's start to its first token",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
TIME_TO_FIRST_REASONING = Histogram(
    "capibara_time_to_first_reasoning_seconds",
    "From a generation's start to a reasoning model's first thinking token",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
TOKENS_PER_SECOND = Histogram(
    "capibara_tokens_per_second",
    "Generation speed of finished answers",
    ["model"],
    buckets=(1, 5, 10, 20, 40, 60, 80, 100, 150, 200, 400),
)
TRACE_SPANS = Counter(
    "capibara_trace_spans_total",
    "Finished spans of sampled traces: exported to the OTLP collector, failed (the collector refused "
    "or was down) or dropped (the queue was full)",
    ["outcome"],
)
GENERATED_TOKENS = Counter("capibara_generated_tokens_total", "Tokens generated", ["model"])
ROUTING_DECISIONS = Counter("capibara_routing_decisions_total", "Chat routing decisions", ["route", "model", "source"])
FAILOVERS = Counter(
    "capibara_failovers_total", "Chats moved to another model before their first token", ["from_model", "to_model"]
)
CACHE_REQUESTS = Counter(
    "capibara_cache_requests_total", "Response cache lookups: exact_hit, semantic_hit or miss", ["result", "route"]
)
# Usage per API key (edge.api_keys_file). `key` is the key's configured name or, without one, the
# first 8 hex digits of its sha256 (capibara_grpc/api_keys.py), never the key itself. Only calls
# that generate (Chat, Complete, OpenAI chat completions) are counted; code is the gRPC code name.
KEY_REQUESTS = Counter(
    "capibara_key_requests", "Generating calls per API key, model and gRPC code", ["key", "model", "code"]
)
KEY_TOKENS = Counter(
    "capibara_key_tokens", "Tokens per API key and model; kind: prompt or completion", ["key", "model", "kind"]
)
# Every call that came through the edge with a key, whatever its API (route, TOON, speech, ...),
# counted by the service the edge sent it to; internal hops carry no key id, so none is counted twice.
KEY_CALLS = Counter(
    "capibara_key_calls",
    "Calls through the edge per API key, by service, method and gRPC code",
    ["key", "service", "method", "code"],
)
QUEUE_DEPTH = Gauge("capibara_queue_depth", "Generations waiting for a slot of the model's backend", ["model"])
ACTIVE_GENERATIONS = Gauge(
    "capibara_active_generations", "Generations holding a slot of the model's backend", ["model"]
)
# The servers of a model whose replicas the inference service balances (backend.balance:
# affinity; capibara_grpc/upstream/replicas.py), `replica` being the server's URL. Outcome of a
# choice: affinity (the server that served the conversation last), fallback (that one was busy or
# down), new (a conversation not seen yet).
REPLICA_IN_FLIGHT = Gauge("capibara_replica_in_flight", "Generations in flight on each server", ["model", "replica"])
REPLICA_PINNED = Gauge(
    "capibara_replica_pinned_conversations", "Conversations whose next turn goes to each server", ["model", "replica"]
)
REPLICA_UP = Gauge("capibara_replica_up", "1 while a server takes chats (healthy, not refusing)", ["model", "replica"])
REPLICA_CHOICES = Counter(
    "capibara_replica_choices", "Chats sent to each server, by outcome", ["model", "replica", "outcome"]
)
REPLICA_LAST_CHOICE = Gauge(
    "capibara_replica_last_choice_timestamp_seconds",
    "When each server was last chosen, by the outcome of that choice",
    ["model", "replica", "outcome"],
)
# The context service as an MCP client (context.mcp_servers): `name` is the tool or resource as
# configured; outcome: ok, error (the server answered an error), timeout, unavailable (no session).
MCP_CALLS = Counter(
    "capibara_mcp_calls_total",
    "MCP tool calls and resource reads by the context service",
    ["server", "name", "outcome"],
)
MCP_SESSIONS = Counter(
    "capibara_mcp_sessions_total", "MCP sessions: opened, failed (could not open) or lost", ["server", "event"]
)


def split_method(full_method: str) -> tuple[str, str]:
    """'/capibara.router.v1.RouterService/Route' -> ('capibara.router.v1.RouterService', 'Route')."""
    service, _, method = full_method.lstrip("/").partition("/")
    return service, method


# (method, code) -> (its labels, request counter, duration histogram): prometheus_client's labels()
# takes a lock and builds a key on every call, which showed in the router's per-call profile.
_CALL_METRICS: dict[tuple[str, str], tuple] = {}


def observe_call(full_method: str, code: str, started: float, key: str = "") -> None:
    """One finished call; `key` is the caller's API key id when it came through the edge with one."""
    cached = _CALL_METRICS.get((full_method, code))
    if cached is None:
        labels = (*split_method(full_method), code)
        cached = _CALL_METRICS[(full_method, code)] = (
            labels,
            REQUESTS.labels(*labels),
            REQUEST_SECONDS.labels(*labels),
        )
    labels, requests, seconds = cached
    requests.inc()
    seconds.observe(time.perf_counter() - started)
    if key:  # the per-key series through labels(): key ids are not known up front
        KEY_CALLS.labels(key, *labels).inc()


async def _metrics(_request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def serve_metrics(host: str, port: int) -> web.AppRunner:
    """GET /metrics on host:port; the caller cleans the returned runner up."""
    app = web.Application()
    app.router.add_get("/metrics", _metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
