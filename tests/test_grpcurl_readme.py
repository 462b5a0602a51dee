"""The README's grpcurl examples, run as written against a live mesh (only the port differs)."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from tests.support.mesh import REPO, VENV_BIN


def readme_examples() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- grpcurl-examples:[^>]*-->\n```sh\n(.*?)```", text, re.S)
    assert block, "the README lost its grpcurl examples block"
    return [line for line in block.group(1).splitlines() if line.strip()]


EXAMPLES = readme_examples()


def test_every_service_has_an_example():
    services = [
        "ChatService",
        "MeshService",
        "RouterService",
        "ContextService",
        "InferenceService",
        "ConsensusService",
        "SpeechService",
        "grpc.health.v1.Health",
    ]
    for service in services:
        assert any(service in line for line in EXAMPLES), service
    assert any(line.endswith(" list") for line in EXAMPLES) and any(" describe " in line for line in EXAMPLES)


@pytest.mark.parametrize("line", EXAMPLES, ids=lambda line: line.split()[-1][:60])
def test_readme_grpcurl_example_runs(mesh, line):
    argv = shlex.split(line.replace("localhost:5001", f"localhost:{mesh.edge.split(':')[1]}"))
    assert argv[0] == "grpcurl"
    result = subprocess.run([str(VENV_BIN / "grpcurl"), *argv[1:]], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
