"""The status page (/status) and its endpoint (GET /api/status) on a mesh of their own: two models,
router on, API keys on, supervision on (a killed llama-server comes back). Chromium (playwright-core,
as tests/test_web_page.py) loads the page on a phone-sized screen. The screenshot of the page with
figures goes to test-artifacts/status-page.png."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import yaml

from capibara_grpc.config import parse_config
from tests.support.mesh import REPO, launched_model, mesh_config, start_mesh, stop_mesh

BROWSER_TESTS = REPO / "tests" / "browser"
SCREENSHOT = REPO / "test-artifacts" / "status-page.png"
BASE = 18000
KEY = "status-page-test-key-0123456789"
AUTH = {"authorization": f"Bearer {KEY}"}
MODELS = ["gpt-oss-20b", "phi"]


@pytest.fixture(scope="module")
def status_mesh(tmp_path_factory):
    assert shutil.which("node") and os.path.exists("/usr/bin/chromium"), "make test installs chromium; node is needed"
    installed = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund"], cwd=BROWSER_TESTS, capture_output=True, text=True, timeout=600
    )
    assert installed.returncode == 0, installed.stderr
    directory = tmp_path_factory.mktemp("status")
    # The repository's routes, with mixtral's routes sent to phi: two models are enough here.
    routes = yaml.safe_load((REPO / "config" / "routes.yaml").read_text())
    for route in routes["routes"].values():
        route["model"] = "phi" if route["model"] == "mixtral" else route["model"]
    (directory / "routes.yaml").write_text(yaml.safe_dump(routes, allow_unicode=True))
    (directory / "keys.txt").write_text(KEY + "\n")
    models = {"gpt-oss-20b": launched_model(BASE + 80, max_tokens=12), "phi": launched_model(BASE + 81, max_tokens=12)}
    config = mesh_config(directory / "state", BASE, models)
    config["router"]["routes_file"] = str(directory / "routes.yaml")
    config["edge"]["api_keys_file"] = str(directory / "keys.txt")
    # The restart waits 6 s: with the default 0.5 s a killed llama-server is back within about a
    # second on a quiet machine, between two of the sampler's 2 s health rounds, and the page never
    # sees it down (seen). 6 s is three rounds and three polls of the page.
    config["supervision"] = {"restart": "on-failure", "backoff_initial_s": 6, "backoff_max_s": 6, "give_up_after": 0}
    mesh = start_mesh(directory, config)
    try:
        yield mesh
    finally:
        stop_mesh(mesh)


def status(mesh) -> dict:
    code, body, _ = mesh.request("GET", "/api/status", headers=AUTH)
    assert code == 200, body
    return body


def chat(mesh, message: str, model: str = "") -> dict:
    code, body, _ = mesh.request("POST", "/api/chat", {"message": message, "model": model}, headers=AUTH)
    assert code == 200, body
    return body


def browser(mesh, phase: str, argument: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["node", "status_page.mjs", mesh.base_url, str(SCREENSHOT), phase, KEY, json.dumps(argument)],
        cwd=BROWSER_TESTS,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_page_is_served_with_the_chat_pages_policy_and_without_a_key(status_mesh):
    code, page, headers = status_mesh.request("GET", "/status")
    assert code == 200 and headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in headers["content-security-policy"]
    assert "http://" not in page and "https://" not in page and "<script>" not in page  # no CDN, no inline code
    for asset in ("/status.js", "/status.css"):
        assert status_mesh.request("GET", asset)[0] == 200


def test_the_endpoint_needs_the_key_like_every_api(status_mesh):
    code, body, _ = status_mesh.request("GET", "/api/status")
    assert code == 401, body
    code, body, _ = status_mesh.request("GET", "/api/status", headers={"authorization": "Bearer not-the-key-00000000"})
    assert code == 401, body


def ready(body: dict) -> bool:
    return body["status"] == "SERVING" and any(p["name"] == "envoy" for p in body.get("processes", []))


def test_the_endpoint_lists_every_service_model_and_process(status_mesh):
    deadline = time.monotonic() + 60
    # The sampler's first rounds (memory is sampled every 6 s; Envoy starts after the gateway).
    while not ready(body := status(status_mesh)) and time.monotonic() < deadline:
        time.sleep(1)
    assert body["status"] == "SERVING", body
    deployed = parse_config(status_mesh.config_path.read_text(), check_files=False).deployed_services
    assert [s["name"] for s in body["services"]] == list(deployed)
    assert all(s["status"] == "SERVING" and s["since"] > 0 for s in body["services"])
    assert [m["model_id"] for m in body["models"]] == MODELS
    assert all(m["status"] == "SERVING" for m in body["models"])
    processes = {p["name"]: p for p in body["processes"]}
    assert {"envoy", "model server gpt-oss-20b", "model server phi"} <= set(processes), processes
    assert any("gateway" in name for name in processes)
    assert all(p["rss_mib"] > 1 and p["pid"] > 1 for p in processes.values())
    assert body["window_s"] == 900


def test_the_counts_match_the_chats_made(status_mesh):
    before = {m["model_id"]: m for m in status(status_mesh)["models"]}
    sources_before = status(status_mesh).get("routing_sources", {})
    for i in range(3):
        assert chat(status_mesh, f"Say hello number {i}", model="phi")["model_id"] == "phi"
    routed = chat(status_mesh, "Write a python function that reverses a list")
    after_body = status(status_mesh)
    after = {m["model_id"]: m for m in after_body["models"]}
    routed_model = routed["model_id"]
    assert after["phi"]["requests"] - before["phi"].get("requests", 0) == 3 + (routed_model == "phi")
    if routed_model != "phi":
        assert after[routed_model]["requests"] - before[routed_model].get("requests", 0) == 1
    assert after_body["routing_sources"]["request"] - sources_before.get("request", 0) == 3
    assert after_body["routing_sources"]["router"] + after_body["routing_sources"].get("default", 0) >= 1
    assert routed["routing"]["route_name"] in {r["route_name"] for r in after_body["routes"]}
    phi = after["phi"]
    assert 0 < phi["ttft_p50_ms"] <= phi["ttft_p95_ms"]
    assert phi["tokens_per_second"] > 0 and phi["completion_tokens"] > 0
    assert phi["minutes"][-1]["requests"] >= 1 or phi["minutes"][-2]["requests"] >= 1
    assert after_body["cache"]["answered"] >= 4
    # Per-key usage: the one key used, with the chats made with it.
    keys = [k for k in after_body.get("keys", []) if k["model"] == "phi"]
    assert keys and int(keys[0]["requests"]) >= 3, after_body.get("keys")


def test_the_page_shows_everything_and_the_figures_move(status_mesh):
    services = [s["name"] for s in status(status_mesh)["services"]]
    overview = browser(status_mesh, "overview", {"services": services, "models": MODELS})
    assert overview.returncode == 0, overview.stdout + overview.stderr
    before = json.loads(overview.stdout.strip().splitlines()[-1])["requests"]
    for model in MODELS:
        chat(status_mesh, "Hola, ¿qué tal?", model=model)
    moved = browser(status_mesh, "moved", before)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    after = json.loads(moved.stdout.strip().splitlines()[-1])["requests"]
    assert all(after[m] > before[m] for m in MODELS)
    assert SCREENSHOT.stat().st_size > 10_000


def test_a_killed_model_server_shows_as_down_then_back(status_mesh):
    (pid,) = status_mesh.llama_server_pids("phi")
    page = subprocess.Popen(
        [
            "node",
            "status_page.mjs",
            status_mesh.base_url,
            str(SCREENSHOT),
            "down-up",
            KEY,
            json.dumps({"model": "phi"}),
        ],
        cwd=BROWSER_TESTS,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # Killed once the page shows phi SERVING (it prints "watching"), so that the page sees it go down.
    seen = []
    for line in page.stdout:
        seen.append(line)
        if line.strip() == "watching":
            break
    assert seen and seen[-1].strip() == "watching", "".join(seen)
    os.kill(pid, signal.SIGKILL)
    output, _ = page.communicate(timeout=600)
    assert page.returncode == 0, output
    assert status_mesh.llama_server_pids("phi") not in ([], [pid])  # the supervisor started a new one
    body = status(status_mesh)
    phi = next(m for m in body["models"] if m["model_id"] == "phi")
    assert phi["status"] == "SERVING" and phi["since"] > time.time() - 300
