"""Configuration validation: a bad file stops startup with a message naming the line to fix."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from capibara_grpc.config import ConfigError, load_config, parse_config

GOOD = """\
models:
  phi:
    backend: {url: "http://127.0.0.1:8081", protocol: llama_cpp}
    launch: {model_path: smollm2}
gateway:
  default_model: phi
router:
  enabled: false
"""


# A hosted API in place of GOOD's launched model; KEYS is replaced by the backend keys under test.
HOSTED = GOOD.replace(
    '{url: "http://127.0.0.1:8081", protocol: llama_cpp}', '{url: "https://api.example.com/v1", protocol: openai, KEYS}'
).replace("    launch: {model_path: smollm2}\n", "")


def test_the_shipped_default_config_is_valid():
    config = load_config()
    assert set(config.models) == {"gpt-oss-20b", "phi", "mixtral"}
    assert config.services.address("gateway") == "127.0.0.1:50050"
    assert config.edge.listen_address == "0.0.0.0" and config.edge.admin_address == "127.0.0.1"
    # The original deployment's sampling defaults.
    defaults = {
        m: (c.defaults.max_tokens, c.defaults.temperature, c.defaults.top_p, c.defaults.repeat_penalty)
        for m, c in config.models.items()
    }
    assert defaults == {
        "gpt-oss-20b": (200, 0.7, 0.9, 1.2),
        "phi": (80, 0.5, 0.85, 1.2),
        "mixtral": (250, 0.7, 0.95, 1.1),
    }


def test_the_shipped_file_states_every_default_of_the_schema():
    """config/capibara.yaml is the defaults file: every key (but a service's replicas and
    metrics_port) with the schema's own value, so the two cannot drift apart."""
    import yaml

    from capibara_grpc.config import DEFAULT_CONFIG_PATH, MeshConfig
    from capibara_grpc.config.parsing import as_data

    def missing(expected, stated, path=""):
        if not isinstance(expected, dict) or not expected:
            return [] if expected == stated else [f"{path.rstrip('.')}: {stated!r} is not the default {expected!r}"]
        optional = {"replicas", "metrics_port"} if path.startswith("services.") else set()
        return [
            problem
            for key, value in expected.items()
            for problem in (
                [f"{path}{key} is not in the file"]
                if key not in stated and key not in optional
                else missing(value, stated[key], f"{path}{key}.")
                if key in stated
                else []
            )
        ]

    stated = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    defaults = as_data(MeshConfig())
    del stated["models"], defaults["models"]
    assert missing(defaults, stated) == []


def test_a_good_config_loads_into_typed_objects():
    config = parse_config(GOOD, source="mesh.yaml")
    assert config.models["phi"].backend.protocol == "llama_cpp"
    assert config.models["phi"].host_port == ("127.0.0.1", 8081)
    assert config.gateway.max_message_bytes == 16384


@pytest.mark.parametrize(
    "text, message",
    [
        (
            GOOD.replace("default_model: phi", "default_model: gpt5"),
            "mesh.yaml:6: gateway.default_model 'gpt5' is not a model defined under 'models' (defined: phi)",
        ),
        (GOOD.replace("protocol: llama_cpp", "protocol: grpc"), "mesh.yaml:3: models.phi.backend.protocol 'grpc'"),
        (
            GOOD.replace("model_path: smollm2", "model_path: /nowhere/model.gguf"),
            "mesh.yaml:4: models.phi.launch.model_path: model file '/nowhere/model.gguf' not found",
        ),
        (
            GOOD + "services:\n  router: {port: 50050}\n",
            "mesh.yaml:10: services.router.port uses port 50050, already used by services.gateway.port",
        ),
        (
            GOOD + "services:\n  gatway: {port: 50150}\n",
            "mesh.yaml:10: unknown key 'gatway' in services (known: consensus, context, event_loop, gateway, host, inference, local_calls, router, speech, via_envoy)",
        ),
        (
            GOOD + "services:\n  router: {port: many}\n",
            "mesh.yaml:10: services.router.port must be an integer, got 'many'",
        ),
        (
            GOOD + "services:\n  router: {replicas: [nowhere]}\n",
            "mesh.yaml:10: services.router.replicas: 'nowhere' is not host:port",
        ),
        (
            GOOD + "edge:\n  port: 8081\n",
            "models.phi (launched llama-server) uses port 8081, already used by edge.port",
        ),
        (GOOD + "gatway:\n  x: 1\n", "mesh.yaml:9: unknown key 'gatway' in the top level"),
        (GOOD + "edge:\n  port: many\n", "mesh.yaml:10: edge.port must be an integer, got 'many'"),
        (GOOD.replace('url: "http://127.0.0.1:8081"', 'url: "127.0.0.1:8081"'), "backend.url must be an http(s) URL"),
        (GOOD + "speech:\n  engine: festival\n", "mesh.yaml:10: speech.engine 'festival' must be one of espeak, coqui"),
        (
            GOOD + "services:\n  event_loop: trio\n",
            "mesh.yaml:10: services.event_loop 'trio' must be one of uvloop, asyncio",
        ),
        (
            GOOD + "tracing:\n  sampler: jaeger\n",  # checked while tracing is off too
            "mesh.yaml:10: tracing.sampler 'jaeger' must be one of parentbased_always_on,",
        ),
        (
            GOOD + "tracing:\n  sampler: traceidratio\n  sampler_arg: 2\n",
            "mesh.yaml:11: tracing.sampler_arg 2.0 must be from 0 to 1",
        ),
        (
            GOOD + "tracing:\n  endpoint: http://collector:4318/v1/traces\n",
            "mesh.yaml:10: tracing.endpoint 'http://collector:4318/v1/traces' has a path",
        ),
        (
            GOOD + "speech:\n  engine: coqui\n",
            "mesh.yaml:10: speech.engine is coqui but speech.coqui names no model_name or model_path",
        ),
        (
            GOOD + "speech:\n  coqui:\n    model_path: /nowhere/model.pth\n    config_path: /nowhere/config.json\n",
            "mesh.yaml:11: speech.coqui.model_path: file '/nowhere/model.pth' not found",
        ),
        (
            GOOD + "speech:\n  espeak: {binary: no-such-espeak}\n",
            "speech.engine is espeak but 'no-such-espeak' is not installed",
        ),
        (
            GOOD.replace("launch: {model_path: smollm2}", "launch: {model_path: smollm2}\n    fallbacks: [gpt5]"),
            "mesh.yaml:5: models.phi.fallbacks: 'gpt5' is not another model defined under 'models' (defined: phi)",
        ),
        (GOOD + "edge:\n  cors_origins: ['*']\n", "mesh.yaml:10: edge.cors_origins: '*' is not an origin"),
        (GOOD + "edge:\n  rate_limit: {chat: -1}\n", "edge.rate_limit.chat must be 0 (no limit) or a positive number"),
        (
            HOSTED.replace("KEYS", "api_key_env: CAPIBARA_TEST_UNSET_KEY"),
            "mesh.yaml:3: models.phi.backend.api_key_env: the environment variable CAPIBARA_TEST_UNSET_KEY is not "
            "set (model 'phi' needs it to call https://api.example.com/v1)",
        ),
        (
            HOSTED.replace("KEYS", "headers: {X-Org: '${CAPIBARA_TEST_UNSET_ORG}'}"),
            "mesh.yaml:3: models.phi.backend.headers: the environment variable CAPIBARA_TEST_UNSET_ORG is not set",
        ),
        (
            HOSTED.replace("KEYS", "headers: {Authorization: Bearer x}"),
            "models.phi.backend.headers: 'Authorization' cannot be set here (the key goes in api_key_env)",
        ),
        (
            GOOD.replace("protocol: llama_cpp", "protocol: llama_cpp, server: vllm"),
            "mesh.yaml:3: models.phi.backend.server 'vllm' speaks the OpenAI API: set protocol: openai",
        ),
        (
            GOOD.replace("protocol: llama_cpp", "protocol: openai, server: tgi"),
            "mesh.yaml:3: models.phi.backend.server 'tgi' must be one of llama_server, vllm, ollama, openai",
        ),
        (
            HOSTED.replace("KEYS", "ca_file: /nowhere/ca.pem"),
            "mesh.yaml:3: models.phi.backend.ca_file: '/nowhere/ca.pem' is not a file",
        ),
        (
            GOOD.replace("launch: {model_path: smollm2}", "launch: {model_path: smollm2}\n    context_window: -1"),
            "mesh.yaml:5: models.phi.context_window must not be negative",
        ),
        ("models: {}\n", "no models defined"),
        ("models: [\n", "not valid YAML"),
    ],
)
def test_bad_config_names_the_line_to_fix(text, message):
    assert "KEYS" not in text
    with pytest.raises(ConfigError) as error:
        parse_config(text, source="mesh.yaml")
    assert message in str(error.value)


def test_a_service_section_keeps_the_defaults_it_does_not_override():
    config = parse_config(
        GOOD + "services:\n  router: {replicas: ['10.0.0.2:50051']}\n  speech: {port: 50155}\n", source="mesh.yaml"
    )
    assert config.services.router.port == 50051 and config.services.router.replicas == ["10.0.0.2:50051"]
    assert config.services.endpoint("speech").port == 50155 and config.services.address("gateway") == "127.0.0.1:50050"
    assert list(config.services.endpoints) == ["gateway", "router", "context", "inference", "consensus", "speech"]


def test_a_config_written_back_reads_the_same():
    import yaml

    from capibara_grpc.config.parsing import as_data

    config = load_config()
    again = parse_config(yaml.safe_dump(as_data(config)), source=config.source, base_dir=config.base_dir)
    assert again == config


def test_a_process_checks_only_the_files_of_the_services_it_runs(tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text(GOOD.replace("model_path: smollm2", "model_path: /nowhere/model.gguf"))
    with pytest.raises(ConfigError, match="model file '/nowhere/model.gguf' not found"):
        load_config(path)
    # The speech service (in the Coqui environment, say) never opens a llama.cpp model.
    assert load_config(path, services=["speech"]).speech.engine == "espeak"


@pytest.mark.parametrize("config_after_command", [False, True])
def test_capibara_up_refuses_a_bad_config_before_starting_anything(tmp_path, config_after_command):
    bad = tmp_path / "config" / "mesh.yaml"
    bad.parent.mkdir()
    bad.write_text(GOOD.replace("default_model: phi", "default_model: gpt5"))
    capibara = pathlib.Path(sys.executable).parent / "capibara"
    # `capibara up --config FILE` and `capibara --config FILE up` alike.
    argv = ["up", "--config", str(bad)] if config_after_command else ["--config", str(bad), "up"]
    result = subprocess.run([str(capibara), *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{bad}:6: gateway.default_model 'gpt5'" in result.stderr


ROUTES = """\
default:
  model: phi
  examples: ["asdf", "qwer", "zxcv"]
routes:
  chat:
    model: phi
    examples: ["hola", "hello", "buenos dias"]
  code:
    model: gpt-oss-20b
    examples: ["write a function", "fix my bug", "sql query"]
"""


@pytest.mark.parametrize(
    "text, message",
    [
        (ROUTES, "routes.yaml:9: routes.code.model 'gpt-oss-20b' is not a model of the mesh (defined: phi)"),
        (ROUTES.replace("model: phi\n  examples", "model: gpt4\n  examples"), "routes.yaml:2: default.model 'gpt4'"),
        (
            ROUTES.replace('examples: ["hola", "hello", "buenos dias"]', 'examples: ["hola"]'),
            "routes.chat needs at least 3 examples",
        ),
        (ROUTES.replace("routes:", "rutas:"), "routes.yaml:4: unknown key 'rutas'"),
    ],
)
def test_bad_routes_file_names_the_line_to_fix(text, message):
    from capibara_grpc.config import parse_routes

    config = parse_config(GOOD, source="mesh.yaml")
    with pytest.raises(ConfigError) as error:
        parse_routes(text, config, source="routes.yaml")
    assert message in str(error.value)


def test_the_shipped_routes_cover_seven_routes_and_the_default():
    from capibara_grpc.config import load_routes
    from tests.support.routes import ARCHITECTURE_DEFAULT_MODEL, ARCHITECTURE_ROUTES

    routes = load_routes(load_config())
    assert {n: r.model for n, r in routes.routes.items()} == ARCHITECTURE_ROUTES
    assert routes.default.model == ARCHITECTURE_DEFAULT_MODEL
