"""The LiteLLM proxy for benchmarks/peers.py: its own venv, its config, its process.

The venv (.venv-litellm, beside .venv) is created on first use and refreshed when
benchmarks/requirements-litellm.txt changes; LiteLLM never enters the mesh's own environment.
The proxy runs as its docs' production checklist ("Best Practices for Production",
docs.litellm.ai/docs/proxy/prod) has it, less what needs other servers: a master key (random, made
for this run, passed in the environment, never written to disk), one worker, no database (so no
spend, error or audit logs and no batch writes), no Slack alerting, no Redis, LITELLM_LOG=ERROR
(FastAPI's per-request info logs off), set_verbose off, JSON logs, telemetry off, the model cost
map read from the package rather than fetched (LITELLM_LOCAL_MODEL_COST_MAP), and
LITELLM_MODE=PRODUCTION (no .env loading).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import secrets
import subprocess
import sys
import time
import urllib.request

import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
VENV = REPO / ".venv-litellm"
REQUIREMENTS = pathlib.Path(__file__).resolve().parent / "requirements-litellm.txt"
STAMP = VENV / ".requirements.sha256"


def ensure_venv() -> pathlib.Path:
    """The litellm executable, installing .venv-litellm first when missing or stale (idempotent)."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    litellm = VENV / "bin" / "litellm"
    if litellm.exists() and STAMP.exists() and STAMP.read_text().strip() == digest:
        return litellm
    print(f"installing LiteLLM into {VENV.name} (benchmarks/requirements-litellm.txt) ...", flush=True)
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "install", "-q"]
    subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
    STAMP.write_text(digest + "\n")
    return litellm


def config(upstream: str, models: list[str]) -> dict:
    """One deployment per model name, each `openai/<name>` on the mock at `upstream` (its /v1)."""
    return {
        "model_list": [
            {
                "model_name": name,
                "litellm_params": {"model": f"openai/{name}", "api_base": upstream, "api_key": "mock-key"},
            }
            for name in models
        ],
        "general_settings": {
            "master_key": "os.environ/LITELLM_MASTER_KEY",
            "disable_spend_logs": True,
            "disable_error_logs": True,
        },
        "litellm_settings": {"request_timeout": 600, "set_verbose": False, "json_logs": True},
    }


class LiteLLM:
    """`litellm --config F --port P --num_workers 1`, started by start() and ended by stop()."""

    def __init__(self, directory: pathlib.Path, port: int, upstream: str, models: list[str]):
        self.directory, self.port = directory, port
        self.key = "sk-bench-" + secrets.token_hex(16)
        self.config_path = directory / "litellm.yaml"
        self.config_path.write_text(yaml.safe_dump(config(upstream, models), sort_keys=False))
        self.log_path = directory / "litellm.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> None:
        """Start the proxy (installing its venv first if need be); wait_ready() waits for it."""
        litellm = ensure_venv()
        env = {
            **os.environ,
            "LITELLM_MASTER_KEY": self.key,
            "LITELLM_LOG": "ERROR",
            "LITELLM_MODE": "PRODUCTION",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        }
        env.pop("DATABASE_URL", None)
        argv = [str(litellm), "--config", str(self.config_path), "--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--num_workers", "1", "--telemetry", "False"]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.directory, start_new_session=True
            )

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"litellm exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health/liveliness", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"litellm did not come up in {timeout_s:g} s:\n{self.log_path.read_text()[-3000:]}")

    def pids(self) -> list[int]:
        """The proxy's root process (its workers, if any, are found below it)."""
        return [self.process.pid] if self.process else []

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
