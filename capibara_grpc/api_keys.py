"""API keys: who a key is (its name or short id), and the usage counted per key.

The keys are checked at the edge (envoy/rest_guard.lua). Once a key is valid, the guard puts its
id, never the key, in the `x-capibara-key-id` request header (a client's own copy is dropped), and
Envoy passes it to the services as gRPC metadata. The gateway counts generating calls and their
tokens per id (capibara_grpc/metrics.py: KEY_REQUESTS, KEY_TOKENS), every service's interceptor
counts each call of every API per id (KEY_CALLS, capibara_grpc/errors.py), and Envoy rate limits per id
(edge/policies.py: key_rate_limit).

Why a header set by the edge rather than the services checking keys themselves: the key never
leaves Envoy, and REST, native gRPC and /v1 all pass the one guard, so one place says who called.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import AsyncIterator, Iterator

from capibara_grpc import metrics, tracing
from capibara_grpc.chat.types import Finished
from capibara_grpc.errors import StreamError, code_name

# A name for a key (the `name: key` form of a keys file line); it goes into metrics and logs.
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHORT_ID_HEX = 8


def short_id(key: str) -> str:
    """A key's stable id when it has no name: the first 8 hex digits of its sha256 (so an operator
    finds which key it is with `printf %s KEY | sha256sum`), never enough to recover the key."""
    return hashlib.sha256(key.encode()).hexdigest()[:_SHORT_ID_HEX]


def split_named_key(text: str) -> tuple[str, str]:
    """'alice: KEY' -> ('alice', 'KEY'); 'KEY' -> ('', 'KEY'). Keys cannot hold ':' (their
    alphabet has none), so the first ':' always ends a name. ValueError for a malformed name."""
    name, colon, key = text.partition(":")
    if not colon:
        return "", text.strip()
    name = name.strip()
    if not _KEY_NAME.match(name):
        raise ValueError(
            f"the key's name '{name[:64]}' must be 1 to 64 characters of A-Z a-z 0-9 . _ - (starting with a letter or digit)"
        )
    return name, key.strip()


def key_id(name: str, key: str) -> str:
    """What metrics, logs and rate limits call the key."""
    return name or short_id(key)


# The model label of a call that failed before a model was chosen (bad input, say) and named none.
NO_MODEL = "-"


class KeyUsage:
    """One generating call of a key: its model, tokens and final code, counted once when it ends.

    The gateway's servicers wrap the call in `counting()` and its chat events in `watch()`; the
    events say the model (the routing decision), the tokens (the final event) and an in-band
    error, an exception the code. Without a key id (a mesh without keys) nothing is counted."""

    def __init__(self, context, models, requested: str = ""):
        """`models`: the configured model ids; a requested model that is not one of them is not a
        label (a client must not be able to add a time series per made-up name)."""
        self.key = tracing.key_id_from(context.invocation_metadata())
        self.models = models
        self.model = requested if requested in models else ""
        self.code = "OK"
        self.prompt_tokens = self.completion_tokens = 0

    @contextlib.contextmanager
    def counting(self):
        try:
            yield self
        except BaseException as exc:
            self.code = code_name(exc)
            raise
        finally:
            self._count()

    async def watch(self, events: AsyncIterator) -> AsyncIterator:
        """The same events, noted on the way."""
        async with contextlib.aclosing(events):
            async for event in events:
                finished = getattr(event, "finished", None)
                if isinstance(finished, Finished):
                    self.finished(finished)
                elif isinstance(event, StreamError):
                    self.code = event.code
                elif getattr(event, "route_name", None) is not None:  # the routing decision
                    self.model = event.model_id
                yield event

    def finished(self, finished: Finished) -> None:
        """The answer's final event: its tokens, and the model that really answered."""
        self.prompt_tokens += finished.prompt_tokens
        self.completion_tokens += finished.completion_tokens
        self.model = finished.model_id or self.model

    def _count(self) -> None:
        if not self.key:
            return
        model = self.model if self.model in self.models else NO_MODEL
        metrics.KEY_REQUESTS.labels(self.key, model, self.code).inc()
        if self.prompt_tokens:
            metrics.KEY_TOKENS.labels(self.key, model, "prompt").inc(self.prompt_tokens)
        if self.completion_tokens:
            metrics.KEY_TOKENS.labels(self.key, model, "completion").inc(self.completion_tokens)


def _counts(counter) -> Iterator[tuple[dict[str, str], int]]:
    """(labels, value) of each series of one of this process's counters; reads that counter only,
    not the whole registry (its histograms have a sample per bucket)."""
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                yield sample.labels, int(sample.value)


def key_usage() -> list[dict]:
    """Usage per key and model, from this process's counters (the gateway's): one dict per
    (key, model) with requests, errors (calls whose code is not OK), prompt_tokens and
    completion_tokens, sorted by key then model. For the status endpoint."""
    rows: dict[tuple[str, str], dict] = {}

    def row(labels: dict[str, str]) -> dict:
        key, model = labels["key"], labels["model"]
        empty = {"key": key, "model": model, "requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0}
        return rows.setdefault((key, model), empty)

    for labels, value in _counts(metrics.KEY_REQUESTS):
        entry = row(labels)
        entry["requests"] += value
        if labels["code"] != "OK":
            entry["errors"] += value
    for labels, value in _counts(metrics.KEY_TOKENS):
        row(labels)[f"{labels['kind']}_tokens"] += value
    return [rows[k] for k in sorted(rows)]


def key_calls() -> list[dict]:
    """Calls of every API per key, from this process's counters (capibara_key_calls_total): one
    dict per (key, method) with calls and errors (code not OK), method as 'RouterService/Route',
    sorted by key then method. With every service in one process (the default) that is all of
    them; with services in their own processes, only the gateway's (Prometheus sums them all)."""
    rows: dict[tuple[str, str], dict] = {}
    for labels, value in _counts(metrics.KEY_CALLS):
        method = f"{labels['service'].rsplit('.', 1)[-1]}/{labels['method']}"
        entry = rows.setdefault(
            (labels["key"], method), {"key": labels["key"], "method": method, "calls": 0, "errors": 0}
        )
        entry["calls"] += value
        if labels["code"] != "OK":
            entry["errors"] += value
    return [rows[k] for k in sorted(rows)]
