"""TOON with every option of the spec (v3, §13): encoder indent, delimiter, key folding and its
flatten depth; decoder indent, strict mode and path expansion. Object key order is kept both ways.

`toon-format` encodes and decodes; key folding (§13.4) and path expansion are not in it, so they
are done here: folding rewrites the value before it is encoded, expansion rewrites each object as
the decoder finishes it (it must know which keys were quoted: quoted keys stay literal).
No gRPC, no I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import toon_format
from toon_format import _decoder  # the decoder's parser, for path expansion (pinned 1.2.0)

from capibara_grpc.errors import InvalidArgument

DELIMITERS = {",": ",", "\t": "\t", "|": "|", "comma": ",", "tab": "\t", "pipe": "|"}
DELIMITER_NAMES = {",": "comma", "\t": "tab", "|": "pipe"}
MODES = ("off", "safe")
MAX_INDENT = 16
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Option names as the spec's conformance fixtures spell them, with their snake_case aliases.
ENCODE_OPTIONS = {
    "indent": "indent",
    "indentSize": "indent",
    "indent_size": "indent",
    "delimiter": "delimiter",
    "keyFolding": "key_folding",
    "key_folding": "key_folding",
    "flattenDepth": "flatten_depth",
    "flatten_depth": "flatten_depth",
}
DECODE_OPTIONS = {
    "indent": "indent",
    "indentSize": "indent",
    "indent_size": "indent",
    "strict": "strict",
    "expandPaths": "expand_paths",
    "expand_paths": "expand_paths",
}


@dataclass(frozen=True)
class EncodeOptions:
    indent: int = 2
    delimiter: str = ","
    key_folding: str = "off"
    flatten_depth: int | None = None  # None: no limit (the spec's Infinity)


@dataclass(frozen=True)
class DecodeOptions:
    indent: int = 2
    strict: bool = True
    expand_paths: str = "off"


def _bad(name: str, value: Any, expected: str) -> InvalidArgument:
    return InvalidArgument(f"options.{name}: {json.dumps(value, ensure_ascii=False)} is not valid; expected {expected}")


def _indent(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_INDENT:
        raise _bad("indent", value, f"an integer from 1 to {MAX_INDENT}")
    return value


def _mode(name: str, value: Any) -> str:
    if value not in MODES:
        raise _bad(name, value, '"off" or "safe"')
    return value


def _names(options: Any, known: dict[str, str]) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise InvalidArgument(f"options must be an object, not {json.dumps(options)[:40]}")
    named: dict[str, Any] = {}
    for key, value in options.items():
        if key not in known:
            raise InvalidArgument(f"unknown option '{key[:64]}' (accepted: {', '.join(sorted(set(known)))})")
        named[known[key]] = value
    return named


def encode_options(options: Any) -> EncodeOptions:
    """Options from a JSON object (spec or snake_case names); a bad value is InvalidArgument naming it."""
    named = _names(options, ENCODE_OPTIONS)
    result = EncodeOptions()
    if named.get("indent") is not None:
        result = _replace(result, indent=_indent(named["indent"]))
    if named.get("delimiter") is not None:
        if not isinstance(named["delimiter"], str) or named["delimiter"] not in DELIMITERS:
            raise _bad("delimiter", named["delimiter"], '",", "\\t" or "|" (or "comma", "tab", "pipe")')
        result = _replace(result, delimiter=DELIMITERS[named["delimiter"]])
    if named.get("key_folding") is not None:
        result = _replace(result, key_folding=_mode("keyFolding", named["key_folding"]))
    depth = named.get("flatten_depth")
    if depth is not None:
        if isinstance(depth, float) and depth == float("inf"):
            depth = None
        elif isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise _bad("flattenDepth", depth, "a non-negative integer (or null for no limit)")
        result = _replace(result, flatten_depth=depth)
    return result


def decode_options(options: Any) -> DecodeOptions:
    named = _names(options, DECODE_OPTIONS)
    result = DecodeOptions()
    if named.get("indent") is not None:
        result = _replace(result, indent=_indent(named["indent"]))
    if named.get("strict") is not None:
        if not isinstance(named["strict"], bool):
            raise _bad("strict", named["strict"], "true or false")
        result = _replace(result, strict=named["strict"])
    if named.get("expand_paths") is not None:
        result = _replace(result, expand_paths=_mode("expandPaths", named["expand_paths"]))
    return result


def _replace(options, **changes):
    return type(options)(**{**options.__dict__, **changes})


# -- encoding --------------------------------------------------------------------------------


def fold_keys(value: Any, flatten_depth: int | None, root_keys: frozenset = frozenset(), prefix: str = "") -> Any:
    """§13.4 safe key folding: a chain of single-key objects whose keys are identifiers becomes one
    dotted key (at most `flatten_depth` segments; the rest stays nested, unfolded), unless that key
    equals a sibling's literal key, or its whole dotted path a literal key at the root."""
    if isinstance(value, list):
        return [fold_keys(item, flatten_depth) for item in value]
    if not isinstance(value, dict):
        return value
    if not prefix:
        root_keys = frozenset(value)
    limit = flatten_depth if flatten_depth is not None else float("inf")
    folded: dict[str, Any] = {}
    for key, child in value.items():
        segments, leaf = [key], child
        while isinstance(leaf, dict) and len(leaf) == 1 and len(segments) < limit:
            ((next_key, next_value),) = leaf.items()
            segments.append(next_key)
            leaf = next_value
        valid = 0
        while valid < len(segments) and IDENTIFIER.fullmatch(segments[valid]):
            valid += 1
        if valid < len(segments):  # fold only the identifier prefix; the rest stays nested
            leaf = _nest(segments[valid:], leaf)
            segments = segments[:valid]
        name = ".".join(segments)
        path = f"{prefix}.{name}" if prefix else name
        if len(segments) >= 2 and name not in value and name not in folded and (not prefix or path not in root_keys):
            # A chain cut short (by flatten_depth or a non-identifier key) continues nested below,
            # unfolded; past the chain's end, folding goes on.
            cut = isinstance(leaf, dict) and len(leaf) == 1
            folded[name] = leaf if cut else fold_keys(leaf, flatten_depth, root_keys, path)
        else:
            folded[key] = fold_keys(child, flatten_depth, root_keys, f"{prefix}.{key}" if prefix else key)
    return folded


def _nest(segments: list[str], leaf: Any) -> Any:
    for segment in reversed(segments):
        leaf = {segment: leaf}
    return leaf


def encode(value: Any, options: EncodeOptions = EncodeOptions()) -> str:  # noqa: B008 (frozen)
    if options.key_folding == "safe":
        value = fold_keys(value, options.flatten_depth)
    try:
        return toon_format.encode(value, indent_size=options.indent, delimiter=options.delimiter)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"cannot encode as TOON: {exc}") from exc


# -- decoding --------------------------------------------------------------------------------


class _QuotedKey(str):
    """A key (or string) that was quoted in the document: path expansion leaves it literal."""


class _ExpandingParser(_decoder._Parser):
    def quoted(self, token, line):
        return _QuotedKey(super().quoted(token, line))


class ExpansionConflict(ValueError):
    pass


def _expandable(key: str) -> bool:
    return not isinstance(key, _QuotedKey) and "." in key and all(IDENTIFIER.fullmatch(s) for s in key.split("."))


def _merge(target: dict, key: str, value: Any, strict: bool, path: str) -> None:
    if key not in target:
        target[key] = value
        return
    existing = target[key]
    if isinstance(existing, dict) and isinstance(value, dict):
        for inner_key, inner_value in value.items():
            _merge(existing, inner_key, inner_value, strict, f"{path}.{inner_key}")
        return
    if strict:
        kinds = " vs ".join("object" if isinstance(v, dict) else _kind(v) for v in (existing, value))
        raise ExpansionConflict(f"expansion conflict at path '{path}' ({kinds})")
    target[key] = value  # last write wins (§14.3)


def _kind(value: Any) -> str:
    return "array" if isinstance(value, list) else "primitive"


def _expand(pairs: list[tuple[str, Any]], strict: bool) -> dict:
    result: dict[str, Any] = {}
    for key, value in pairs:
        segments = key.split(".") if _expandable(key) else [str(key)]
        target, path = result, ""
        for segment in segments[:-1]:
            path = f"{path}.{segment}" if path else segment
            if not isinstance(target.get(segment, {}), dict):
                if strict:
                    raise ExpansionConflict(f"expansion conflict at path '{path}' (object vs {_kind(target[segment])})")
                del target[segment]
            target = target.setdefault(segment, {})
        last = segments[-1]
        _merge(target, last, value, strict, f"{path}.{last}" if path else last)
    return {str(k): v for k, v in result.items()}


def decode(text: str, options: DecodeOptions = DecodeOptions()) -> Any:  # noqa: B008 (frozen)
    """The JSON value of a TOON document, keys in document order. A document that does not
    parse is InvalidArgument naming the line and what is wrong."""
    try:
        if options.expand_paths == "off":
            return toon_format.decode(text, indent_size=options.indent, strict=options.strict)
        lines = _decoder._split_lines(text, options.indent, options.strict)
        parser = _ExpandingParser(lines, options.strict, None, None, None, lambda pairs: _expand(pairs, options.strict))
        return parser.document()
    except toon_format.ToonDecodeError as exc:
        raise InvalidArgument(f"TOON does not parse: {exc}") from exc
    except ExpansionConflict as exc:
        raise InvalidArgument(f"TOON does not expand: {exc}") from exc
    except RecursionError as exc:
        raise InvalidArgument("TOON does not parse: the document is nested too deeply") from exc


# -- JSON text, order kept ---------------------------------------------------------------------


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is out of range for a number")
    return value


def parse_json(text: str | bytes, what: str = "body") -> Any:
    """JSON text to Python, keys in their order; an error names line and column."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"invalid JSON in {what} at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"invalid JSON in {what}: {exc}") from exc


def compact_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
