"""docs/configuration.md is generated from the schema and kept current."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import typing

from capibara_grpc.config import docs
from capibara_grpc.config.parsing import yaml_fields
from capibara_grpc.config.schema import MeshConfig

CAPIBARA = pathlib.Path(sys.executable).parent / "capibara"


def test_the_reference_is_current():
    result = subprocess.run([str(CAPIBARA), "config-docs", "--check"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def _keys(cls, path: str = ""):
    """Every dotted key of the schema, with <id> / <name> for the keys of mappings."""
    hints = typing.get_type_hints(cls)
    for f in yaml_fields(cls):
        nested = docs._section_of(hints[f.name])
        if f.metadata.get("inline"):
            yield from _keys(typing.get_args(hints[f.name])[1], f"{path}.<name>")
        elif nested:
            kind, is_mapping = nested
            yield from _keys(kind, f"{path}.{f.name}" + (".<id>" if is_mapping else ""))
        else:
            yield f"{path}.{f.name}".lstrip(".")


def test_every_setting_is_documented():
    rendered = docs.render()
    keys = list(_keys(MeshConfig))
    assert "services.<name>.port" in keys and "models.<id>.launch.model_path" in keys
    for key in keys:
        assert f"`{key}`" in rendered, key


def test_the_check_names_the_command_that_fixes_it(tmp_path, monkeypatch):
    monkeypatch.setattr(docs, "DOC_PATH", tmp_path / "configuration.md")
    assert "run `capibara config-docs`" in docs.check()
    docs.write()
    assert docs.check() is None
