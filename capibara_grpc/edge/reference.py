"""envoy/envoy.reference.yaml: what `capibara envoy-config` renders from config/capibara.yaml.

For a person looking for what Envoy runs; nothing loads it. The real file is rendered by
`capibara envoy-config` (and `capibara up`) into the state directory, with absolute paths; here
the paths are relative to the repository, so the reference is the same on every checkout.
tests/test_envoy_reference.py fails when it is stale.

    python -m capibara_grpc.edge.reference           # rewrite it
    python -m capibara_grpc.edge.reference --check   # exit 1 if it differs from a fresh render
"""

from __future__ import annotations

import argparse
import difflib
import pathlib
import sys

import yaml

from capibara_grpc.config import DEFAULT_CONFIG_PATH, REPO_ROOT, MeshConfig, load_config
from capibara_grpc.edge import envoy_config

REFERENCE = REPO_ROOT / "envoy" / "envoy.reference.yaml"
REGENERATE = "python -m capibara_grpc.edge.reference"


def _relative(value, root: str):
    """`value` with every absolute path under `root` made relative to it."""
    if isinstance(value, dict):
        return {k: _relative(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v, root) for v in value]
    if isinstance(value, str) and value.startswith(root + "/"):
        return value[len(root) + 1 :]
    return value


def _bootstrap(config: MeshConfig) -> dict:
    """What `envoy_config.write` renders, without writing the descriptor or making a certificate."""
    state = config.state_path
    edge = config.edge
    cert = config.resolve_path(edge.tls_cert) if edge.tls_cert else state / "tls" / "edge.crt"
    key = config.resolve_path(edge.tls_key) if edge.tls_key else state / "tls" / "edge.key"
    # environ={}: the reference shows the config file's Envoy, whatever OTEL_* this shell has.
    return envoy_config.build(config, state / "envoy" / "capibara.pb", cert, key, environ={})


def render(config_path: pathlib.Path = DEFAULT_CONFIG_PATH) -> str:
    config = load_config(config_path, check_files=False)
    root = str(config.base_dir)
    source = _relative(config.source, root)
    return (
        f"# Reference only: what `capibara envoy-config` renders from {source}, with paths relative\n"
        f"# to the repository. Envoy loads the file `capibara up` writes to .state/envoy/envoy.yaml.\n"
        f"# Regenerate: {REGENERATE}. (Generated, so longer than our 400 lines: every route and cluster.)\n"
        + yaml.safe_dump(_relative(_bootstrap(config), root), sort_keys=False, width=120)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=REGENERATE, description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if envoy/envoy.reference.yaml is stale")
    args = parser.parse_args(argv)
    fresh = render()
    current = REFERENCE.read_text() if REFERENCE.is_file() else ""
    if args.check:
        if current == fresh:
            return 0
        diff = difflib.unified_diff(current.splitlines(True), fresh.splitlines(True), str(REFERENCE), "rendered")
        sys.stdout.writelines(list(diff)[:200])
        print(f"{REFERENCE} is stale; regenerate it: {REGENERATE}", file=sys.stderr)
        return 1
    REFERENCE.write_text(fresh)
    print(REFERENCE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
