"""Reading the configuration: find the file, parse it (parsing), fill in what the file does not
say, validate it (validation)."""

from __future__ import annotations

import os
import pathlib
import typing

from capibara_grpc.config.parsing import ConfigError, parse_yaml
from capibara_grpc.config.schema import DEFAULT_CONFIG_PATH, REPO_ROOT, MeshConfig
from capibara_grpc.config.validation import EDGE_FILES, validate
from capibara_grpc.services import SERVICE_NAMES


def load_config(
    path: str | os.PathLike | None = None, *, check_files: bool = True, services: typing.Iterable[str] = SERVICE_NAMES
) -> MeshConfig:
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


def parse_config(
    text: str,
    *,
    source: str = "<string>",
    base_dir: pathlib.Path = REPO_ROOT,
    check_files: bool | set[str] = True,
) -> MeshConfig:
    """The configuration in `text`; `source` names it in messages. `check_files`: True (every
    service's files must exist), False, or the services whose files to check."""
    config = parse_yaml(text, MeshConfig, source)
    config.source = source
    config.base_dir = base_dir
    for model_id, model in config.models.items():
        model.model_id = model_id
    everything = {*SERVICE_NAMES, EDGE_FILES}
    validate(config, check_files=everything if check_files is True else set(check_files or ()))
    return config
