"""The generated TypeScript client (clients/typescript): generated from the protos with buf and
protoc-gen-es from npm, built with tsc, and run against the live mesh through Envoy (native gRPC
over TLS)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.support.mesh import REPO

CLIENT = REPO / "clients" / "typescript"


def npm(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["npm", *args], cwd=CLIENT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def built_client():
    assert shutil.which("npm"), "Node.js and npm are needed (Debian: nodejs npm)"
    for step in (("ci", "--no-audit", "--no-fund"), ("run", "generate"), ("run", "build")):
        result = npm(*step)
        assert result.returncode == 0, f"npm {' '.join(step)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return CLIENT / "dist" / "example.js"


def test_generated_code_covers_every_service(built_client):
    generated = CLIENT / "src" / "gen" / "capibara"
    for service in ("gateway", "router", "context", "inference", "consensus", "speech"):
        assert (generated / service / "v1" / f"{service}_pb.ts").is_file(), service


def test_typescript_example_streams_a_chat_and_routes_through_envoy(mesh, built_client):
    result = subprocess.run(
        ["node", str(built_client), "--target", f"localhost:{mesh.edge.split(':')[1]}", "--ca", str(mesh.cert)],
        cwd=CLIENT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "route: programming -> gpt-oss-20b" in result.stdout
    assert "answering: " in result.stdout and "done: " in result.stdout
