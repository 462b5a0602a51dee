"""Generates the Envoy configuration of the edge from the mesh configuration.

Where each REST path goes: the protos' google.api.http annotations (see `capibara envoy-config
--routes`). Envoy's gRPC-JSON transcoder turns a REST call into the gRPC call of that annotation;
the route table then sends each gRPC service to its own cluster.
"""

from __future__ import annotations

import json
import pathlib

import yaml

from capibara_grpc.config import SERVICE_NAMES, MeshConfig
from capibara_grpc.edge import descriptor
from capibara_grpc.edge.tls import ensure_certificate
from capibara_grpc.stubs import MESH_SERVICE, SERVICE_FULL_NAMES

LUA_FILTER = pathlib.Path(__file__).with_name("rest_guard.lua")
# Request body limit for REST calls (the gateway applies its own, smaller message limit).
MAX_REQUEST_BYTES = 1024 * 1024
# Unary REST responses are buffered by the transcoder; the largest is a spoken WAV (3000
# characters of speech at 22-24 kHz is about 10 MB).
MAX_RESPONSE_BYTES = 32 * 1024 * 1024


def _cluster(name: str, host: str, port: int) -> dict:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(host, port)}}]}],
        },
    }


def _socket(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def _to_cluster(prefix: str, cluster: str) -> dict:
    return {
        "match": {"prefix": prefix},
        "route": {
            "cluster": cluster,
            # No fixed 15 s cut-off: a stream lasts as long as the client's deadline. grpc-timeout
            # is passed on to the services, which enforce it; if Envoy enforced it too it would
            # reset a started stream instead of ending it with DEADLINE_EXCEEDED.
            "timeout": "0s",
        },
    }


def _not_deployed(prefix: str, service: str) -> dict:
    return {
        "match": {"prefix": prefix},
        "direct_response": {"status": 404, "body": {"inline_string": f"{service} is not deployed in this mesh yet"}},
    }


def _allowed_fields() -> dict[str, tuple[list[str], list[str]]]:
    """REST path -> (accepted JSON body field names, their proto names), for rejecting unknown
    fields (the transcoder would silently drop them). Both snake_case and lowerCamel are valid."""
    allowed = {}
    for rule in descriptor.http_rules():
        if rule["body"] == "*":
            fields = rule["input"].fields
            accepted = sorted({f.name for f in fields} | {f.json_name for f in fields})
            allowed[rule["path"]] = (accepted, sorted(f.name for f in fields))
    return allowed


def _lua_source() -> str:
    entries = []
    for path, (accepted, listing) in sorted(_allowed_fields().items()):
        names = ", ".join(f"[{json.dumps(n)}] = true" for n in accepted)
        entries.append(f'  [{json.dumps(path)}] = {{fields = {{{names}}}, listing = {json.dumps(", ".join(listing))}}}')
    return "ALLOWED_FIELDS = {\n" + ",\n".join(entries) + "\n}\n\n" + LUA_FILTER.read_text()


# Envoy's own replies get the same JSON body as the services' errors, with the gRPC code that
# matches the HTTP status (google.rpc.Status numbering).
LOCAL_REPLY_GRPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 413: 3, 429: 8, 503: 14, 504: 4}


def _local_reply_config() -> dict:
    def body(code) -> dict:
        return {
            "json_format": {"code": code, "message": "%LOCAL_REPLY_BODY%", "details": []},
            "content_type": "application/json",
        }

    mappers = [
        {
            "filter": {
                "status_code_filter": {
                    "comparison": {"op": "EQ", "value": {"default_value": http, "runtime_key": f"capibara.local_reply.{http}"}}
                }
            },
            "body_format_override": body(grpc),
        }
        for http, grpc in LOCAL_REPLY_GRPC_CODES.items()
    ]
    return {"mappers": mappers, "body_format": body(2)}


def build(config: MeshConfig, descriptor_path: pathlib.Path, cert: pathlib.Path, key: pathlib.Path) -> dict:
    host = config.services.host
    deployed = config.deployed_services
    routes = [
        _to_cluster(f"/{MESH_SERVICE}/", "gateway"),
        # Reflection and health of the front door are the gateway's: it describes the whole mesh.
        _to_cluster("/grpc.reflection.", "gateway"),
        _to_cluster("/grpc.health.v1.Health/", "gateway"),
    ]
    for service in SERVICE_NAMES:
        full_name = SERVICE_FULL_NAMES[service]
        routes.append(
            _to_cluster(f"/{full_name}/", service) if service in deployed else _not_deployed(f"/{full_name}/", full_name)
        )
    routes.append({"match": {"prefix": "/"}, "direct_response": {"status": 404, "body": {"inline_string": "no such path"}}})

    transcoder = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
        "proto_descriptor": str(descriptor_path),
        "services": list(SERVICE_FULL_NAMES.values()) + [MESH_SERVICE],
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
        "stream_idle_timeout": f"{int(config.edge.stream_idle_timeout_s)}s",
        "request_timeout": "0s",
        "route_config": {"name": "edge", "virtual_hosts": [{"name": "mesh", "domains": ["*"], "routes": routes}]},
        "http_filters": [
            {
                "name": "envoy.filters.http.lua",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                    "default_source_code": {"inline_string": _lua_source()},
                },
            },
            {"name": "envoy.filters.http.grpc_json_transcoder", "typed_config": transcoder},
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
        "local_reply_config": _local_reply_config(),
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
    return {
        "admin": {"address": _socket(config.edge.admin_address, config.edge.admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "edge",
                    "address": _socket(config.edge.listen_address, config.edge.port),
                    "filter_chains": [
                        {
                            "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}],
                            "transport_socket": tls,
                        }
                    ],
                }
            ],
            "clusters": [_cluster(s, host, getattr(config.services, s).port) for s in deployed],
        },
    }


def write(config: MeshConfig) -> pathlib.Path:
    """Write descriptor, certificate and envoy.yaml into the state directory; return the config path."""
    state = config.state_path / "envoy"
    state.mkdir(parents=True, exist_ok=True)
    descriptor_path = state / "capibara.pb"
    descriptor_path.write_bytes(descriptor.descriptor_set().SerializeToString())
    cert, key = ensure_certificate(config)
    envoy_yaml = state / "envoy.yaml"
    envoy_yaml.write_text(
        "# Generated by `capibara envoy-config` from " + config.source + "; do not edit.\n"
        + yaml.safe_dump(build(config, descriptor_path, cert, key), sort_keys=False, width=120)
    )
    return envoy_yaml
