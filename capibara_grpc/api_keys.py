"""API keys: who a key is (its name or short id), and the usage counted per key.

The keys are checked at the edge (envoy/rest_guard.lua). Once a key is valid, the guard puts its
id, never the key, in the `x-capibara-key-id` request header (a client's own copy is dropped), and
Envoy passes it to the services as gRPC metadata. The gateway counts generating calls and their
tokens per id (capibara_grpc/metrics.py: KEY_REQUESTS, KEY_TOKENS) and Envoy rate limits per id
(edge/policies.py: key_rate_limit).

Why a header set by the edge rather than the services checking keys themselves: the key never
leaves Envoy, and REST, native gRPC and /v1 all pass the one guard, so one place says who called.
"""

from __future__ import annotations

import hashlib
import re

from prometheus_client import REGISTRY

# Set by the edge guard after it accepted the key; read by the gateway as gRPC metadata.
KEY_ID_HEADER = "x-capibara-key-id"
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


def request_key_id(metadata) -> str:
    """The caller's key id from a call's invocation metadata ('' when the mesh has no keys or the
    call did not come through the edge)."""
    for item in metadata or ():
        if item[0] == KEY_ID_HEADER:
            value = item[1]
            return value.decode() if isinstance(value, bytes) else value
    return ""


def key_usage(registry=REGISTRY) -> list[dict]:
    """Usage per key and model, from this process's counters (the gateway's): one dict per
    (key, model) with requests, errors (calls whose code is not OK), prompt_tokens and
    completion_tokens, sorted by key then model. For the status endpoint."""
    rows: dict[tuple[str, str], dict] = {}

    def row(key: str, model: str) -> dict:
        return rows.setdefault(
            (key, model),
            {"key": key, "model": model, "requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0},
        )

    for family in registry.collect():
        if family.name not in ("capibara_key_requests", "capibara_key_tokens"):
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            labels, value = sample.labels, int(sample.value)
            entry = row(labels["key"], labels["model"])
            if family.name == "capibara_key_requests":
                entry["requests"] += value
                if labels["code"] != "OK":
                    entry["errors"] += value
            else:
                entry[f"{labels['kind']}_tokens"] += value
    return [rows[k] for k in sorted(rows)]
