"""The mesh configuration: one YAML file loaded into typed, validated objects.

Every error names the file and line to fix, e.g. ``config/capibara.yaml:41: gateway.default_model
'gpt5' is not a model defined under 'models' (defined: gpt-oss-20b, mixtral, phi)``.

One module per job; import from here:
- schema: the sections and their settings, each documented where it is defined (rendered into
  docs/configuration.md by `capibara config-docs`, see docs.py)
- parsing: YAML to those objects, keeping every value's line
- validation: what types cannot say (models exist, ports distinct, files there), API keys
- loading: load_config / parse_config, the entry points
- routes: the routes file (router.routes_file)
- model_files: the GGUF a launched llama-server loads
"""

from capibara_grpc.config.loading import load_config, parse_config
from capibara_grpc.config.model_files import SHIPPED_MODELS, resolve_model_file, shipped_model_path
from capibara_grpc.config.parsing import ConfigError
from capibara_grpc.config.routes import DefaultRouteSpec, RoutesFile, RouteSpec, load_routes, parse_routes
from capibara_grpc.config.schema import (
    CHAT_TEMPLATES,
    DEFAULT_CONFIG_PATH,
    PROTOCOLS,
    REPO_ROOT,
    SPEECH_ENGINES,
    SUPERVISION_RESTART,
    BackendConfig,
    CacheConfig,
    ConsensusConfig,
    ContextConfig,
    CoquiConfig,
    EdgeConfig,
    EspeakConfig,
    GatewayConfig,
    LaunchConfig,
    MeshConfig,
    ModelConfig,
    RateLimitConfig,
    RouterConfig,
    SamplingDefaults,
    ServiceEndpoint,
    ServicesConfig,
    SpeechConfig,
    SupervisionConfig,
    url_host_port,
)
from capibara_grpc.config.validation import api_keys
from capibara_grpc.services import SERVICE_NAMES

# Every service of the table has an implementation (a start function); kept for older imports.
IMPLEMENTED_SERVICES = SERVICE_NAMES

__all__ = [
    "BackendConfig",
    "CacheConfig",
    "CHAT_TEMPLATES",
    "ConfigError",
    "ConsensusConfig",
    "ContextConfig",
    "CoquiConfig",
    "DEFAULT_CONFIG_PATH",
    "DefaultRouteSpec",
    "EdgeConfig",
    "EspeakConfig",
    "GatewayConfig",
    "IMPLEMENTED_SERVICES",
    "LaunchConfig",
    "MeshConfig",
    "ModelConfig",
    "PROTOCOLS",
    "RateLimitConfig",
    "REPO_ROOT",
    "RouterConfig",
    "RouteSpec",
    "RoutesFile",
    "SamplingDefaults",
    "SERVICE_NAMES",
    "ServiceEndpoint",
    "ServicesConfig",
    "SHIPPED_MODELS",
    "SPEECH_ENGINES",
    "SpeechConfig",
    "SUPERVISION_RESTART",
    "SupervisionConfig",
    "api_keys",
    "load_config",
    "load_routes",
    "parse_config",
    "parse_routes",
    "resolve_model_file",
    "shipped_model_path",
    "url_host_port",
]
