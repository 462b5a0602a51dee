"""The web chat page in a real browser: Debian's Chromium driven by playwright-core (npm),
against a mesh of its own (three models, router on). Screenshots go to test-artifacts/screenshots."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest

from tests.support.mesh import REPO, launched_model, processes_using, running_mesh

BROWSER_TESTS = REPO / "tests" / "browser"
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"


@pytest.fixture(scope="module")
def web_mesh(tmp_path_factory):
    assert shutil.which("node") and os.path.exists("/usr/bin/chromium"), "make test installs chromium; node is needed"
    installed = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund"], cwd=BROWSER_TESTS, capture_output=True, text=True, timeout=600
    )
    assert installed.returncode == 0, installed.stderr
    models = {"gpt-oss-20b": launched_model(20080), "phi": launched_model(20081), "mixtral": launched_model(20082)}
    # Not restarted: the backend-down phase needs phi to stay down (tests/test_supervision.py
    # shows it coming back).
    with running_mesh(tmp_path_factory.mktemp("web"), 20000, models, supervision={"restart": "no"}) as mesh:
        yield mesh


def browser(mesh, phase: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["node", "web_chat.mjs", mesh.base_url, str(SCREENSHOTS), phase],
        cwd=BROWSER_TESTS,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_page_is_served_offline_with_a_strict_policy(web_mesh):
    status, page, headers = web_mesh.request("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in headers["content-security-policy"]
    assert "http://" not in page and "https://" not in page  # nothing from a CDN
    for asset in ("/app.js", "/style.css"):
        assert web_mesh.request("GET", asset)[0] == 200


def test_chat_page_in_a_real_browser(web_mesh):
    result = browser(web_mesh, "main")
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("1-sent", "2-answer", "3-reloaded", "4-audio", "5-consensus", "6-erased"):
        assert (SCREENSHOTS / f"main-{name}.png").stat().st_size > 1000


def test_page_folds_a_reasoning_models_thinking_above_the_answer(web_mesh):
    # The mesh's SmolLM2 streams no reasoning: the page's /api/chat/stream is a stub there that sends
    # the transcoder's SSE events (routing, reasoning..., token..., done); the rest is the live mesh.
    result = browser(web_mesh, "reasoning")
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("1-thinking", "2-folded", "3-unfolded", "4-no-reasoning"):
        assert (SCREENSHOTS / f"reasoning-{name}.png").stat().st_size > 1000


def test_page_shows_a_clear_error_when_a_backend_is_stopped(web_mesh):
    port = web_mesh.backend_url("phi").rsplit(":", 1)[1]
    (line,) = [p for p in processes_using(f"--port {port}") if "llama-server" in p]
    os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
    result = browser(web_mesh, "backend-down")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (SCREENSHOTS / "backend-down-1-error.png").exists()
