"""buf on the protos: lint is clean, and `buf breaking` (WIRE_JSON) catches a change that would
break clients, so CI can trust it."""

from __future__ import annotations

import shutil
import subprocess
import sys

from tests.support.mesh import REPO, VENV_BIN

sys.path.insert(0, str(REPO / "tools"))
import buf_breaking  # noqa: E402 - tools/ holds scripts, not a package

BUF = str(VENV_BIN / "buf")


def test_buf_lint_is_clean():
    result = subprocess.run([BUF, "lint"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_catches_a_renamed_json_field(tmp_path):
    """The very check CI runs (tools/buf_breaking.py), on a change that breaks JSON clients."""
    changed = tmp_path / "changed"
    shutil.copytree(REPO / "protos", changed / "protos")
    shutil.copytree(REPO / ".build" / "proto-deps", changed / "deps")
    (changed / "buf.yaml").write_text("version: v2\nmodules:\n  - path: protos\n  - path: deps\n")
    gateway = changed / "protos" / "capibara" / "gateway" / "v1" / "gateway.proto"
    text = gateway.read_text()
    assert "  string conversation_id = 2;" in text
    gateway.write_text(text.replace("  string conversation_id = 2;", "  string conversation = 2;", 1))
    result = buf_breaking.breaking(REPO, changed, tmp_path)
    assert result.returncode != 0
    assert 'changed name from "conversation_id" to "conversation"' in result.stdout

    gateway.write_text(text + "\nmessage AddedLater {\n  string note = 1;\n}\n")  # additions are fine
    result = buf_breaking.breaking(REPO, changed, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
