"""What the edge enforces and serves itself, as Envoy config fragments: the Lua guard (API keys,
unknown JSON fields), the files Envoy serves (web page, OpenAPI document), per-client rate limits,
CORS, and Envoy's own error replies. envoy_config.py puts them together with the routes and
clusters.
"""

from __future__ import annotations

import json
import math
import pathlib

from capibara_grpc.edge import descriptor
from capibara_grpc.services import CHAT, SERVICES
from capibara_grpc.stubs import MESH_SERVICE
from capibara_grpc.tracing import KEY_ID_HEADER

_REPO = pathlib.Path(__file__).resolve().parent.parent.parent
LUA_FILTER = _REPO / "envoy" / "rest_guard.lua"
# key_short_id() for the guard: an API key's id when it has no name (capibara_grpc/api_keys.py).
KEY_ID_LUA = _REPO / "envoy" / "key_id.lua"
# Written by `capibara openapi` from the protos; served at GET /api/openapi.json.
OPENAPI_DOCUMENT = _REPO / "docs" / "openapi.json"


def allowed_fields() -> dict[str, tuple[list[str], list[str]]]:
    """REST path -> (accepted JSON body field names, their proto names), for rejecting unknown
    fields (the transcoder would silently drop them). Both snake_case and lowerCamel are valid."""
    allowed = {}
    for rule in descriptor.http_rules():
        # An HttpBody request is passed on raw; its service checks the JSON itself.
        if rule["body"] == "*" and rule["input"].full_name != "google.api.HttpBody":
            fields = rule["input"].fields
            accepted = sorted({f.name for f in fields} | {f.json_name for f in fields})
            allowed[rule["path"]] = (accepted, sorted(f.name for f in fields))
    return allowed


def _lua_table(entries: list[str]) -> str:
    return "{\n" + ",\n".join(f"  {e}" for e in entries) + "\n}"


def lua_source(keys_file: str) -> str:
    entries = []
    for path, (accepted, listing) in sorted(allowed_fields().items()):
        names = ", ".join(f"[{json.dumps(n)}] = true" for n in accepted)
        entries.append(f"[{json.dumps(path)}] = {{fields = {{{names}}}, listing = {json.dumps(', '.join(listing))}}}")
    # The keys themselves never go into Envoy's config: the guard reads them when it loads, from
    # this file (a Kubernetes Secret, say) and from $CAPIBARA_API_KEYS.
    return (
        f"ALLOWED_FIELDS = {_lua_table(entries)}\n\n"
        f"API_KEYS_FILE = {json.dumps(keys_file)}\n\n"
        f"OPEN_PATHS = {_lua_table([f'[{json.dumps(p)}] = true' for p in OPEN_PATHS])}\n\n"
        + KEY_ID_LUA.read_text()
        + LUA_FILTER.read_text()
    )


WEB = _REPO / "envoy" / "web"
# Files Envoy serves itself: the web chat page (no CDN, works offline) and the API description.
STATIC_FILES = {
    "/": (WEB / "index.html", "text/html; charset=utf-8"),
    "/app.js": (WEB / "app.js", "text/javascript; charset=utf-8"),
    "/style.css": (WEB / "style.css", "text/css; charset=utf-8"),
    # The live status page (data from GET /api/status, which needs a key when keys are on).
    "/status": (WEB / "status.html", "text/html; charset=utf-8"),
    "/status.js": (WEB / "status.js", "text/javascript; charset=utf-8"),
    "/status.css": (WEB / "status.css", "text/css; charset=utf-8"),
    "/api/openapi.json": (OPENAPI_DOCUMENT, "application/json"),
}
# The page loads nothing from elsewhere and runs no inline code.
_PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; media-src 'self' blob:; connect-src 'self' blob:; img-src 'self' data:",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def static_file(path: str, file: pathlib.Path, content_type: str) -> dict:
    headers = {"content-type": content_type, **_PAGE_HEADERS}
    return {
        "match": {"path": path, "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
        "direct_response": {"status": 200, "body": {"filename": str(file)}},
        "response_headers_to_add": [
            {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for k, v in headers.items()
        ],
    }


# Open without an API key and never rate limited: load balancers and probes must see health, and
# anyone may load the page and read the API's description (the page asks for a key itself).
OPEN_PATHS = [
    "/health",
    *STATIC_FILES,
    f"/{MESH_SERVICE}/GetHealth",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
]
# Calls that generate (and so cost a model's time): the tighter per-client limit (each service's
# rate_tier in capibara_grpc/services.py).
GENERATING_SERVICES = tuple(s.name for s in SERVICES if s.rate_tier == CHAT)


def _bucket(per_minute: int) -> dict:
    """`per_minute` tokens, one back every 60/per_minute s; 0: never empty."""
    if per_minute <= 0:
        return {"max_tokens": 1_000_000_000, "tokens_per_fill": 1_000_000_000, "fill_interval": "1s"}
    return {"max_tokens": per_minute, "tokens_per_fill": 1, "fill_interval": f"{60.0 / per_minute:.3f}s"}


def rate_limit(per_minute: int, per_key: int = 0, key_overrides: dict[str, int] | None = None) -> dict:
    """Per client address: a bucket of `per_minute` tokens, one back every 60/per_minute s. Per API
    key, by the id the guard puts in KEY_ID_HEADER: a bucket of `per_key` for each key, or of
    `key_overrides[id]` (0: none) for the keys named there (Envoy prefers an exact descriptor to
    the wildcard one). A call takes a token from every bucket it matches."""
    descriptors, actions = [], []
    if per_minute > 0:
        descriptors.append({"entries": [{"key": "remote_address"}], "token_bucket": _bucket(per_minute)})
        actions.append({"actions": [{"remote_address": {}}]})
    key_limits = {**({"": per_key} if per_key > 0 else {}), **(key_overrides or {})}
    for key_id, limit in key_limits.items():
        entry = {"key": "api_key", **({"value": key_id} if key_id else {})}
        descriptors.append({"entries": [entry], "token_bucket": _bucket(limit)})
    if key_limits:
        # No header (a mesh without keys, an open path): no descriptor, no per-key limit.
        actions.append({"actions": [{"request_headers": {"header_name": KEY_ID_HEADER, "descriptor_key": "api_key"}}]})
    if not descriptors:
        return {}
    # One Retry-After for the route, whichever bucket ran dry: the slowest refill, so that a
    # client that waits that long always finds a token again.
    refill_s = max(60.0 / n for n in (per_minute, *key_limits.values()) if n > 0)
    return {
        "envoy.filters.http.local_ratelimit": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "client_rate_limit",
            # The route-wide bucket is never the limit; the per-client and per-key descriptors are.
            "token_bucket": {"max_tokens": 1_000_000_000, "tokens_per_fill": 1_000_000_000, "fill_interval": "1s"},
            "filter_enabled": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            "filter_enforced": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            "descriptors": descriptors,
            "max_dynamic_descriptors": 100_000,
            "rate_limits": actions,
            # gRPC callers get RESOURCE_EXHAUSTED (as from a full model queue), not UNAVAILABLE.
            "rate_limited_as_resource_exhausted": True,
            "response_headers_to_add": [
                {
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    "header": {"key": "retry-after", "value": str(max(1, math.ceil(refill_s)))},
                }
            ],
        }
    }


def cors_policy(origins: list[str]) -> dict:
    return {
        "envoy.filters.http.cors": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
            "allow_origin_string_match": [{"exact": origin} for origin in origins],
            "allow_methods": "GET, POST, DELETE, OPTIONS",
            # The mcp-* and last-event-id ones: MCP clients in a browser (/mcp, Streamable HTTP);
            # traceparent and tracestate: a traced page's chat joins its trace (docs/tracing.md).
            "allow_headers": "authorization, x-api-key, content-type, grpc-timeout, x-grpc-web, x-user-agent, x-request-id, "
            "traceparent, tracestate, mcp-protocol-version, mcp-session-id, mcp-method, mcp-name, last-event-id",
            "expose_headers": "retry-after, grpc-status, grpc-message, x-request-id, mcp-session-id",
            "max_age": "600",
            # No cookies: the API authenticates with keys in headers.
            "allow_credentials": False,
        }
    }


# Envoy's own replies get the same JSON body as the services' errors, with the gRPC code that
# matches the HTTP status (google.rpc.Status numbering).
LOCAL_REPLY_GRPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 413: 3, 429: 8, 503: 14, 504: 4}


def local_reply_config() -> dict:
    def body(code) -> dict:
        return {
            "json_format": {"code": code, "message": "%LOCAL_REPLY_BODY%", "details": []},
            "content_type": "application/json",
        }

    mappers = [
        {
            "filter": {
                "status_code_filter": {
                    "comparison": {
                        "op": "EQ",
                        "value": {"default_value": http, "runtime_key": f"capibara.local_reply.{http}"},
                    }
                }
            },
            "body_format_override": body(grpc),
        }
        for http, grpc in LOCAL_REPLY_GRPC_CODES.items()
    ]
    # Any other error status: UNKNOWN. Not a body_format for every local reply: direct responses
    # (the OpenAPI document) are local replies too, and must go out as they are.
    mappers.append(
        {
            "filter": {
                "status_code_filter": {
                    "comparison": {
                        "op": "GE",
                        "value": {"default_value": 400, "runtime_key": "capibara.local_reply.any_error"},
                    }
                }
            },
            "body_format_override": body(2),
        }
    )
    return {"mappers": mappers}
