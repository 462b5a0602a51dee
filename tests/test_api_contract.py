"""The REST contract: docs/openapi.json is generated from the protos and current, Envoy serves
it, and schemathesis fuzzes the live surface through Envoy against it."""

from __future__ import annotations

import json
import subprocess

from tests.support.mesh import REPO, VENV_BIN


def test_openapi_document_matches_the_protos():
    checked = subprocess.run([str(VENV_BIN / "capibara"), "openapi", "--check"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_openapi_document_is_served_and_covers_every_rest_path(mesh):
    status, served, headers = mesh.request("GET", "/api/openapi.json")
    assert status == 200 and headers["content-type"] == "application/json"
    assert served == json.loads((REPO / "docs" / "openapi.json").read_text())
    routes = subprocess.run(
        [str(VENV_BIN / "capibara"), "--config", str(mesh.config_path), "envoy-config", "--routes"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for line in routes:
        verb, path = line.split()[:2]
        assert verb.lower() in served["paths"][path], line


def test_fuzzing_the_live_rest_surface_finds_no_server_error_or_schema_violation(mesh, tmp_path):
    # Bounded: a few examples per operation, positive and negative, through the HTTPS edge.
    run = subprocess.run(
        [
            str(VENV_BIN / "st"),
            "run",
            f"{mesh.base_url}/api/openapi.json",
            "--url",
            mesh.base_url,
            "--tls-verify",
            str(mesh.cert),
            "--max-examples",
            "20",
            "--seed",
            "1",
            "--workers",
            "2",
            "--phases",
            "examples,fuzzing",
            "--request-timeout",
            "60",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
