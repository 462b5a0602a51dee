"""envoy/ holds what Envoy loads and serves, and envoy/envoy.reference.yaml is what the renderer
gives for config/capibara.yaml today (a drift check), and a config Envoy accepts. No mesh."""

from __future__ import annotations

import os
import subprocess

from capibara_grpc.config import load_config
from capibara_grpc.edge import descriptor, envoy_config, reference
from capibara_grpc.edge.tls import ensure_certificate
from tests.support.mesh import REPO, VENV_BIN

ENVOY_DIR = REPO / "envoy"


def test_what_envoy_loads_and_serves_lives_in_envoy():
    assert envoy_config.LUA_FILTER == ENVOY_DIR / "rest_guard.lua" and envoy_config.LUA_FILTER.is_file()
    assert envoy_config.WEB == ENVOY_DIR / "web"
    page = {path: file for path, (file, _) in envoy_config.STATIC_FILES.items() if file.parent == envoy_config.WEB}
    assert sorted(page) == ["/", "/app.js", "/status", "/status.css", "/status.js", "/style.css"] and all(
        file.is_file() for file in page.values()
    )


def test_the_reference_config_is_current():
    assert reference.REFERENCE.read_text() == reference.render(), (
        f"envoy/envoy.reference.yaml is stale; regenerate it: {reference.REGENERATE}"
    )
    assert str(REPO) not in reference.REFERENCE.read_text()  # the same on every checkout


def test_the_check_command_agrees():
    assert reference.main(["--check"]) == 0


def test_envoy_accepts_the_reference(tmp_path):
    """Validated from a directory laid out as the repository: relative paths resolve from there."""
    config = load_config(check_files=False)
    config.state_dir = str(tmp_path / ".state")
    ensure_certificate(config)  # .state/tls/edge.crt and .key, where the reference points
    (tmp_path / ".state" / "envoy").mkdir(parents=True)
    (tmp_path / ".state" / "envoy" / "capibara.pb").write_bytes(descriptor.descriptor_set().SerializeToString())
    for name in ("envoy", "docs"):
        os.symlink(REPO / name, tmp_path / name)
    result = subprocess.run(
        [str(VENV_BIN / "envoy"), "--mode", "validate", "-c", str(reference.REFERENCE)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
