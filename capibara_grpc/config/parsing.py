"""YAML to typed objects, keeping the line of every value.

The YAML nodes (not the plain data) are walked against the dataclasses of the schema, so a wrong
type or an unknown key is reported at its line, and validation can later name the line of any
value (`line_of`). Generic: it knows nothing of the mesh, only dataclasses, lists, dicts, scalars
and two field markers (metadata): `internal` (never read from YAML) and `inline` (a dict whose
entries sit beside the class's other keys, as services.<name> does).
"""

from __future__ import annotations

import dataclasses
import types
import typing

import yaml


class ConfigError(ValueError):
    """The configuration is invalid; the message says where."""


class Where:
    def __init__(self, source: str):
        self.source = source

    def error(self, node: yaml.Node, message: str) -> ConfigError:
        return ConfigError(f"{self.source}:{node.start_mark.line + 1}: {message}")


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
# Set on each object built from YAML: its own line, and the line of each key it was given.
_LINES = "_yaml_lines"


def line_of(obj, key: str | None = None) -> int | str:
    """The line of `key` in the mapping `obj` was built from, else of the mapping; "?" when the
    object did not come from a file (a default)."""
    node_line, key_lines = vars(obj).get(_LINES, ("?", {}))
    return key_lines.get(key, node_line) if key is not None else node_line


def _scalar(where: Where, node: yaml.Node, kind: type, path: str):
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


def yaml_fields(kind) -> list[dataclasses.Field]:
    """The fields of a dataclass that YAML may set."""
    return [f for f in dataclasses.fields(kind) if f.init and not f.metadata.get("internal")]


def inline_field(kind) -> dataclasses.Field | None:
    return next((f for f in yaml_fields(kind) if f.metadata.get("inline")), None)


def build(where: Where, node: yaml.Node, kind, path: str, default=None):
    """The value of type `kind` that `node` describes; `default` (a dataclass instance) supplies
    the keys the node leaves out."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):  # X | None
        (inner,) = [a for a in typing.get_args(kind) if a is not type(None)]
        # `key: null` (or ~) is the unset value, as `as_data` writes it; a dataclass keeps its rule below.
        if not dataclasses.is_dataclass(inner) and isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            return None
        return build(where, node, inner, path)
    if origin is list:
        if not isinstance(node, yaml.SequenceNode):
            raise where.error(node, f"{path} must be a list")
        (item_kind,) = typing.get_args(kind)
        return [build(where, item, item_kind, f"{path}[{i}]") for i, item in enumerate(node.value)]
    if origin is dict:
        if not isinstance(node, yaml.MappingNode):
            raise where.error(node, f"{path} must be a mapping")
        _, value_kind = typing.get_args(kind)
        result = {}
        for key_node, value_node in node.value:
            key = _scalar(where, key_node, str, f"a key of {path}")
            result[key] = build(where, value_node, value_kind, f"{path}.{key}")
        return result
    if dataclasses.is_dataclass(kind):
        return _build_dataclass(where, node, kind, path, default)
    return _scalar(where, node, kind, path)


def _build_dataclass(where: Where, node: yaml.Node, kind, path: str, default):
    if isinstance(node, yaml.ScalarNode) and node.value in ("", "~", "null"):
        return dataclasses.replace(default) if default is not None else kind()
    if not isinstance(node, yaml.MappingNode):
        raise where.error(node, f"{path} must be a mapping")
    hints = typing.get_type_hints(kind)
    fields = {f.name for f in yaml_fields(kind)}
    inline = inline_field(kind)
    # An inline dict's entries are keyed by the names its default holds, each entry starting from
    # its default (services.router: {replicas: [...]} keeps router's port).
    inline_defaults = inline.default_factory() if inline else {}
    known = (fields - {inline.name} if inline else fields) | set(inline_defaults)
    values, lines, entries = {}, {}, {}
    for key_node, value_node in node.value:
        key = _scalar(where, key_node, str, f"a key of {path or 'the file'}")
        if key not in known:
            raise where.error(
                key_node, f"unknown key '{key}' in {path or 'the top level'} (known: {', '.join(sorted(known))})"
            )
        key_path = f"{path}.{key}".lstrip(".")
        if key in inline_defaults:
            value_kind = typing.get_args(hints[inline.name])[1]
            entries[key] = build(where, value_node, value_kind, key_path, default=inline_defaults[key])
        else:
            values[key] = build(where, value_node, hints[key], key_path)
        lines[key] = key_node.start_mark.line + 1
    if inline:
        values[inline.name] = {**inline_defaults, **entries}
    obj = dataclasses.replace(default, **values) if default is not None else kind(**values)
    vars(obj)[_LINES] = (node.start_mark.line + 1, lines)
    return obj


def parse_yaml(text: str, kind, source: str):
    """An object of dataclass `kind` from YAML text; ConfigError naming `source` and the line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    return kind() if root is None else build(Where(source), root, kind, "")


def as_data(obj):
    """The plain data (dicts, lists, scalars) that YAML would need to give `obj`: the inverse of
    `build`, with internal fields left out and inline dicts beside the other keys."""
    if dataclasses.is_dataclass(obj):
        data = {}
        for f in yaml_fields(type(obj)):
            value = as_data(getattr(obj, f.name))
            if f.metadata.get("inline"):
                data.update(value)
            else:
                data[f.name] = value
        return data
    if isinstance(obj, dict):
        return {key: as_data(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [as_data(value) for value in obj]
    return obj
