"""Generates the Envoy configuration of the edge from the mesh configuration.

Where each REST path goes: the protos' google.api.http annotations (see `capibara envoy-config
--routes`). Envoy's gRPC-JSON transcoder turns a REST call into the gRPC call of that annotation;
the route table then sends each gRPC service to its own cluster. What the edge enforces and
serves itself (Lua guard, static files, rate limits, CORS, error replies) is in policies.py.
With tracing on (`tracing:`, OTEL_* variables), every listener traces with Envoy's OpenTelemetry
tracer (tracing.py).
"""

from __future__ import annotations

import os
import pathlib
import typing

import yaml

from capibara_grpc.config import MeshConfig, api_keys
from capibara_grpc.config.mcp_endpoint import PATH as MCP_PATH
from capibara_grpc.config.mcp_endpoint import http_addresses as mcp_addresses
from capibara_grpc.edge import descriptor
from capibara_grpc.edge.clusters import mcp_cluster, model_cluster, service_cluster, socket_address

# Still importable from here (`as` marks a re-export): what Envoy loads and serves, the rate tiers.
from capibara_grpc.edge.policies import GENERATING_SERVICES as GENERATING_SERVICES
from capibara_grpc.edge.policies import LUA_FILTER as LUA_FILTER
from capibara_grpc.edge.policies import OPENAPI_DOCUMENT as OPENAPI_DOCUMENT
from capibara_grpc.edge.policies import (
    STATIC_FILES,
    cors_policy,
    local_reply_config,
    lua_source,
    rate_limit,
    static_file,
)
from capibara_grpc.edge.policies import WEB as WEB
from capibara_grpc.edge.tls import ensure_certificate
from capibara_grpc.edge.tracing import envoy_traces, trace
from capibara_grpc.services import CHAT, SERVICES
from capibara_grpc.stubs import MESH_SERVICE, OPENAI_SERVICE, SERVICE_FULL_NAMES
from capibara_grpc.telemetry.settings import TracingSettings
from capibara_grpc.telemetry.settings import resolve as resolve_tracing

# Request body limit for REST calls (the gateway applies its own, smaller message limit).
MAX_REQUEST_BYTES = 1024 * 1024
# Unary REST responses are buffered by the transcoder; the largest is a spoken WAV (3000
# characters of speech at 22-24 kHz is about 10 MB).
MAX_RESPONSE_BYTES = 32 * 1024 * 1024


def _models_listener(config: MeshConfig, bind_all: bool = False) -> dict:
    """Plain HTTP on loopback to the models whose replicas Envoy balances (backend.balance:
    least_requests): /models/<id>/<path> -> a server."""
    routes = [
        {
            "match": {"prefix": f"/models/{model.model_id}/"},
            "route": {
                "cluster": f"model-{model.model_id}",
                "prefix_rewrite": "/",
                "timeout": "0s",
                # A refused or reset connection before any answer goes to another server, and
                # so does a 503: llama-server listens at once when (re)started and answers 503
                # "Loading model" for ~0.2 s until its weights are in (measured with curl on a
                # fresh start). A 503 comes before any token, so nothing is replayed.
                "retry_policy": {
                    "retry_on": "connect-failure,reset,retriable-status-codes",
                    "retriable_status_codes": [503],
                    "num_retries": 2,
                    **_OTHER_HOSTS,
                },
            },
        }
        for model in config.models.values()
        if model.balanced_by_envoy
    ]
    return _internal_listener("models", config, config.edge.models_port, "AUTO", routes, bind_all)


def _internal_listener(name: str, config: MeshConfig, port: int, codec: str, routes: list, bind_all: bool) -> dict:
    """A plaintext listener for the mesh's own traffic: loopback (or the pod's interfaces), no
    time limits (streams last as long as their deadline), just routing."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "codec_type": codec,
        "stream_idle_timeout": "0s",
        "request_timeout": "0s",
        "route_config": {"name": name, "virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}]},
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    return {
        "name": name,
        "address": socket_address("0.0.0.0" if bind_all else config.edge.mesh_address, port),
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


# Retried: a call the replica refused or could not take (UNAVAILABLE, connection failure or reset).
# Envoy retries only before it has passed any response on, so a stream that has started streaming
# is never replayed.
# A retry goes to another replica than the ones already tried, when there is one.
_OTHER_HOSTS = {
    "retry_host_predicate": [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
            },
        }
    ],
    "host_selection_retry_max_attempts": 5,
}
RETRY_POLICY = {
    "retry_on": "unavailable,connect-failure,reset",
    "num_retries": 2,
    "retry_back_off": {"base_interval": "0.05s", "max_interval": "0.5s"},
    **_OTHER_HOSTS,
}


# To inference, not UNAVAILABLE: there it is a model server's failure (5xx, unreachable, no first
# token in time), which the gateway's failover answers by trying the next model; retrying the same
# model here would triple a timeout and repeat a call the server already failed.
INFERENCE_RETRY_POLICY = {**RETRY_POLICY, "retry_on": "connect-failure,reset"}


# At the edge only what surely never reached a service: a refused connection or stream, or a
# replica that went away before answering. (UNAVAILABLE from a service is its answer to the client.)
EDGE_RETRY_POLICY = {
    "retry_on": "connect-failure,refused-stream,reset",
    "num_retries": 2,
    "retry_back_off": {"base_interval": "0.05s", "max_interval": "0.5s"},
    **_OTHER_HOSTS,
}


def _to_cluster(prefix: str, cluster: str, retry: dict | None = EDGE_RETRY_POLICY) -> dict:
    return {
        "match": {"prefix": prefix},
        "route": {
            "cluster": cluster,
            # No fixed 15 s cut-off: a stream lasts as long as the client's deadline. grpc-timeout
            # is passed on to the services, which enforce it; if Envoy enforced it too it would
            # reset a started stream instead of ending it with DEADLINE_EXCEEDED.
            "timeout": "0s",
            **({"retry_policy": retry} if retry else {}),
        },
    }


def _rate_limited(route: dict, limit: dict) -> dict:
    if limit:
        route["typed_per_filter_config"] = limit
    return route


def _limit_of(config: MeshConfig, tier: str) -> dict:
    """The rate limits of a tier's routes: per client address and per API key (overrides: chat)."""
    per_key = config.edge.key_rate_limit
    overrides = per_key.chat_overrides if tier == CHAT else None
    return rate_limit(getattr(config.edge.rate_limit, tier), getattr(per_key, tier), overrides)


def _mesh_listener(config: MeshConfig, bind_all: bool = False) -> dict:
    """Loopback, plaintext h2: how the services reach each other (services.via_envoy)."""
    routes = [
        _to_cluster(f"/{SERVICE_FULL_NAMES[s]}/", s, retry=INFERENCE_RETRY_POLICY if s == "inference" else RETRY_POLICY)
        for s in config.deployed_services
    ]
    routes.append({"match": {"prefix": "/"}, "direct_response": {"status": 404}})
    return _internal_listener("mesh", config, config.edge.mesh_port, "HTTP2", routes, bind_all)


def _not_deployed(prefix: str, service: str) -> dict:
    return {
        "match": {"prefix": prefix},
        "direct_response": {"status": 404, "body": {"inline_string": f"{service} is not deployed in this mesh yet"}},
    }


def _service_addresses(config: MeshConfig, service: str) -> list[tuple[str, int]]:
    endpoint = config.services.endpoint(service)
    replicas = [(h, int(p)) for h, _, p in (r.rpartition(":") for r in endpoint.replicas)]
    return [(config.services.host, endpoint.port), *replicas]


def build(
    config: MeshConfig,
    descriptor_path: pathlib.Path,
    cert: pathlib.Path,
    key: pathlib.Path,
    keys_file: str | None = None,
    addresses=None,
    bind_all: bool = False,
    *,
    tracing: TracingSettings | None = None,
    environ: typing.Mapping[str, str] | None = None,
) -> dict:
    """Envoy's bootstrap. For a deployment elsewhere (Kubernetes), `keys_file` is where the API keys
    will be mounted, `addresses(service)` gives each service's endpoints by DNS name, and
    `bind_all` makes the mesh listeners listen on every interface of the pod. `tracing`: the
    settings Envoy traces with; by default `config.tracing` with the OTEL_* variables of `environ`
    (os.environ by default) winning, as in every process of the mesh."""
    api_keys(config)  # a malformed key stops here, with its file and line
    if tracing is None:
        tracing = resolve_tracing(config.tracing, os.environ if environ is None else environ)
    if keys_file is None:
        keys_file = str(config.resolve_path(config.edge.api_keys_file)) if config.edge.api_keys_file else ""
    addresses = addresses or (lambda service: _service_addresses(config, service))
    deployed = config.deployed_services
    # Models with backend.balance: affinity are balanced by the inference service itself.
    replicated_models = [m for m in config.models.values() if m.balanced_by_envoy]
    routes = [
        _to_cluster(f"/{MESH_SERVICE}/", "gateway"),
        # The OpenAI-compatible API (/v1/...) is the gateway's, and generates: the chat limit.
        _rate_limited(_to_cluster(f"/{OPENAI_SERVICE}/", "gateway"), _limit_of(config, CHAT)),
        # MCP over Streamable HTTP (capibara_grpc/mcp_server/http.py), the path exactly. Its tools
        # generate, so every MCP request counts against the chat limits. The Lua guard checks the key
        # as for any call and reads no body off its REST paths: JSON-RPC passes, SSE streams unbuffered.
        _rate_limited({**_to_cluster(MCP_PATH, "mcp"), "match": {"path": MCP_PATH}}, _limit_of(config, CHAT)),
        # Reflection and health of the front door are the gateway's: it describes the whole mesh.
        _to_cluster("/grpc.reflection.", "gateway"),
        _to_cluster("/grpc.health.v1.Health/", "gateway"),
    ]
    for row in SERVICES:
        if row.name not in deployed:
            routes.append(_not_deployed(f"/{row.full_name}/", row.full_name))
            continue
        route = _to_cluster(f"/{row.full_name}/", row.name)
        routes.append(_rate_limited(route, _limit_of(config, row.rate_tier)))
    routes += [static_file(path, file, content_type) for path, (file, content_type) in STATIC_FILES.items()]
    routes.append(
        {"match": {"prefix": "/"}, "direct_response": {"status": 404, "body": {"inline_string": "no such path"}}}
    )
    if config.edge.cors_origins:
        # Preflight requests carry REST paths, which no route above matches before transcoding;
        # the CORS filter answers them only on a route that forwards, so they get one (first).
        preflight = _to_cluster("/", "gateway")
        preflight["match"]["headers"] = [{"name": ":method", "string_match": {"exact": "OPTIONS"}}]
        routes.insert(0, preflight)

    transcoder = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
        "proto_descriptor": str(descriptor_path),
        "services": list(SERVICE_FULL_NAMES.values()) + [MESH_SERVICE, OPENAI_SERVICE],
        "print_options": {
            "add_whitespace": False,
            "always_print_primitive_fields": True,
            "always_print_enums_as_ints": False,
            "preserve_proto_field_names": True,
            "stream_sse_style_delimited": True,
        },
        "convert_grpc_status": True,
        "max_request_body_size": MAX_REQUEST_BYTES,
        "max_response_body_size": MAX_RESPONSE_BYTES,
        "request_validation_options": {"reject_unknown_method": False, "reject_unknown_query_parameters": True},
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "edge",
        "codec_type": "AUTO",
        "use_remote_address": True,
        # Every request gets an x-request-id (a client may bring its own, to correlate); it goes to
        # the services as gRPC metadata, back to the client, and into this access log.
        "preserve_external_request_id": True,
        "always_set_request_id_in_response": True,
        "access_log": [
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                    "log_format": {
                        "json_format": {
                            "ts": "%START_TIME%",
                            "request_id": "%REQ(X-REQUEST-ID)%",
                            "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
                            "method": "%REQ(:METHOD)%",
                            "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
                            "status": "%RESPONSE_CODE%",
                            "grpc_status": "%GRPC_STATUS%",
                            "flags": "%RESPONSE_FLAGS%",
                            "ms": "%DURATION%",
                            "upstream": "%UPSTREAM_CLUSTER%",
                        }
                    },
                },
            }
        ],
        "stream_idle_timeout": f"{int(config.edge.stream_idle_timeout_s)}s",
        "request_timeout": "0s",
        # A client that trickles its request headers (slowloris) is cut off.
        "request_headers_timeout": "10s",
        "route_config": {
            "name": "edge",
            "max_direct_response_body_size_bytes": 4 * 1024 * 1024,
            "virtual_hosts": [
                {
                    "name": "mesh",
                    "domains": ["*"],
                    "routes": routes,
                    **(
                        {"typed_per_filter_config": cors_policy(config.edge.cors_origins)}
                        if config.edge.cors_origins
                        else {}
                    ),
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.lua",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                    "default_source_code": {"inline_string": lua_source(keys_file)},
                },
            },
            {"name": "envoy.filters.http.grpc_json_transcoder", "typed_config": transcoder},
            # CORS after the transcoder: a transcoded call has its gRPC route, and so the policy.
            # Preflight requests pass the guard (no key needed) and the transcoder (no such method).
            {
                "name": "envoy.filters.http.cors",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"},
            },
            # After the transcoder, so REST and gRPC calls of one method share one route and one limit.
            {
                "name": "envoy.filters.http.local_ratelimit",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                    "stat_prefix": "client_rate_limit",
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
        "local_reply_config": local_reply_config(),
    }
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificates": [
                    {"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}
                ],
            },
        },
    }
    bootstrap = {
        "admin": {"address": socket_address(config.edge.admin_address, config.edge.admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "edge",
                    "address": socket_address(config.edge.listen_address, config.edge.port),
                    "filter_chains": [
                        {
                            "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}],
                            "transport_socket": tls,
                        }
                    ],
                },
                *([_mesh_listener(config, bind_all)] if config.services.via_envoy else []),
                *([_models_listener(config, bind_all)] if replicated_models else []),
            ],
            "clusters": [service_cluster(s, addresses(s)) for s in deployed]
            + [mcp_cluster(mcp_addresses(config, addresses("gateway")))]
            + [model_cluster(m.model_id, m.server_urls) for m in replicated_models],
        },
    }
    return trace(bootstrap, tracing) if envoy_traces(tracing) else bootstrap


def write(config: MeshConfig) -> pathlib.Path:
    """Write descriptor, certificate and envoy.yaml into the state directory; return the config path."""
    state = config.state_path / "envoy"
    state.mkdir(parents=True, exist_ok=True)
    descriptor_path = state / "capibara.pb"
    descriptor_path.write_bytes(descriptor.descriptor_set().SerializeToString())
    cert, key = ensure_certificate(config)
    envoy_yaml = state / "envoy.yaml"
    # It holds the API keys: readable by this user only.
    envoy_yaml.touch(mode=0o600)
    envoy_yaml.chmod(0o600)
    envoy_yaml.write_text(
        "# Generated by `capibara envoy-config` from "
        + config.source
        + "; do not edit.\n"
        + yaml.safe_dump(build(config, descriptor_path, cert, key), sort_keys=False, width=120)
    )
    return envoy_yaml
