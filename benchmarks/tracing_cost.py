"""What tracing costs (issue 30): the mesh's CPU per chat with tracing off, with 1 % of chats
sampled, and with every chat sampled, measured in one run against the same mock model server.

Starts, on loopback: the mock OpenAI-compatible server (benchmarks/openai_mock.py, 8-token
answers), an OTLP/gRPC collector that keeps nothing (benchmarks/otlp_sink.py, its own process),
and three meshes like peers.py's (router and cache off, admission raised, mesh_nice 0):
  - off:   no tracing section (base 5600);
  - 1 %:   tracing.endpoint the sink, sampler parentbased_traceidratio 0.01 (base 5700);
  - 100 %: the same with parentbased_always_on (base 5800).
Then, in rounds that interleave the three so each sees the machine as the others do, wrk sends
8-token /v1 chats through each mesh's TLS edge, 32 in flight, and reads the CPU of every process
of that mesh (`capibara up` with its services, Envoy) from /proc. Prints CPU per chat, req/s, and
the spans the collector received per chat (a check that the sampling did what it says), and the
goal: 100 % costs at most 10 % more CPU per chat than off.

    .venv/bin/python benchmarks/tracing_cost.py               # 3 rounds of 6 s (about 2 minutes)
    .venv/bin/python benchmarks/tracing_cost.py --rounds 5 --seconds 10
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.peers import CHAT_TOKENS, IN_FLIGHT, chat_body, load_average, mesh_models, mock_upstream
from benchmarks.peers_load import tree_cpu, wrk
from benchmarks.peers_report import check_answer
from tests.support.mesh import mesh_config, running_mesh

SINK_PORT = 5695
SETTINGS = {
    "off": (5600, None),
    "1 %": (5700, {"sampler": "parentbased_traceidratio", "sampler_arg": 0.01}),
    "100 %": (5800, {"sampler": "parentbased_always_on"}),
}


@contextlib.contextmanager
def sink():
    argv = [sys.executable, str(pathlib.Path(__file__).with_name("otlp_sink.py")), str(SINK_PORT)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        if process.stdout.readline().strip() != "sink serving":
            raise RuntimeError("the OTLP sink did not start")
        yield process
    finally:
        process.terminate()
        process.wait(10)


def spans_received(process) -> int:
    process.send_signal(signal.SIGUSR1)
    line = process.stdout.readline().split()
    REQUESTS.append(int(line[3]))
    return int(line[1])


REQUESTS: list[int] = []


@contextlib.contextmanager
def mesh(directory: pathlib.Path, base: int, tracing: dict | None):
    where = directory / f"mesh-{base}"
    where.mkdir()
    models = mesh_models(routed=False)
    defaults = mesh_config(where / "state", base, models)
    sections = {"supervision": {"mesh_nice": 0}, "edge": {**defaults["edge"], "admin_port": base + 99}}
    if tracing is not None:
        sections["tracing"] = {"endpoint": f"http://127.0.0.1:{SINK_PORT}", "schedule_delay_ms": 1000, **tracing}
    with running_mesh(where, base, models, router=False, **sections) as running:
        yield running


def _envoy_s(result) -> float:
    return sum(seconds for label, seconds in result.cpu_s.items() if "envoy" in label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    for variable in [v for v in os.environ if v.startswith("OTEL_")]:
        del os.environ[variable]  # the meshes' settings are this script's
    load_before, started = load_average(), time.time()
    rows: dict[str, list] = {name: [] for name in SETTINGS}
    spans: dict[str, list[float]] = {name: [] for name in SETTINGS}
    sink_cpu: dict[str, list[float]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="tracing-") as tmp, mock_upstream(), sink() as collector:
        directory = pathlib.Path(tmp)
        with contextlib.ExitStack() as stack:
            meshes = {name: stack.enter_context(mesh(directory, base, t)) for name, (base, t) in SETTINGS.items()}
            urls = {
                name: f"https://127.0.0.1:{m.config['edge']['port']}/v1/chat/completions" for name, m in meshes.items()
            }
            for url in urls.values():
                check_answer(url, chat_body(), "", CHAT_TOKENS)
                wrk(url, chat_body(), directory, 3, IN_FLIGHT)  # warm
            time.sleep(2)  # the warm-up's spans leave before the first round
            for _ in range(args.rounds):
                for name, url in urls.items():
                    before = spans_received(collector)
                    sink_before = sum(cpu for _, cpu in tree_cpu([collector.pid]).values())
                    result = wrk(
                        url, chat_body(), directory, args.seconds, IN_FLIGHT, cpu_of=[meshes[name].process.pid]
                    )
                    time.sleep(1.5)  # the round's last batch reaches the collector
                    sink_cpu[name].append(
                        (sum(c for _, c in tree_cpu([collector.pid]).values()) - sink_before) / result.requests * 1e6
                    )
                    rows[name].append(result)
                    spans[name].append((spans_received(collector) - before) / max(result.requests, 1))
    print(
        f"tracing_cost.py: {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{args.rounds} rounds of {args.seconds:g} s, {IN_FLIGHT} in flight, {CHAT_TOKENS}-token /v1 chats; "
        f"load average before {load_before}, after {load_average()}; {time.time() - started:.0f} s"
    )
    print(
        f"{'tracing':<8} {'CPU/chat (us)':>14} {'rounds':>24} {'services':>9} {'Envoy':>6} {'req/s':>8} "
        f"{'errors':>7} {'spans/chat':>11}"
    )
    cpu = {}
    for name, results in rows.items():
        per_round = [r.cpu_us_per(r.requests) for r in results]
        cpu[name] = statistics.mean(per_round)
        envoy = statistics.mean(_envoy_s(r) / r.requests * 1e6 for r in results)
        print(
            f"{name:<8} {cpu[name]:>14,.0f} {', '.join(f'{x:,.0f}' for x in per_round):>24} "
            f"{cpu[name] - envoy:>9,.0f} {envoy:>6,.0f} {statistics.mean(r.rps for r in results):>8,.0f} {sum(r.errors for r in results):>7} "
            f"{statistics.mean(spans[name]):>11.2f}"
        )
    print("exports received, running total:", REQUESTS)
    print(
        "the collector's own CPU per chat (not counted above): "
        + ", ".join(f"{n} {statistics.mean(v):,.0f} us" for n, v in sink_cpu.items())
    )
    median = {name: statistics.median(r.cpu_us_per(r.requests) for r in results) for name, results in rows.items()}
    print(
        "medians of the rounds (a round that met a busy moment weighs less): "
        + ", ".join(f"{name} {value:,.0f} us" for name, value in median.items())
        + f"; 100 % over off {100 * (median['100 %'] / median['off'] - 1):+.1f} %"
    )
    for name in ("1 %", "100 %"):
        print(f"{name} over off: {100 * (cpu[name] / cpu['off'] - 1):+.1f} %")
    extra = cpu["100 %"] / cpu["off"] - 1
    print(
        f"goal: 100 % sampling costs at most 10 % more CPU per chat: {'MET' if extra <= 0.10 else 'NOT MET'} ({100 * extra:+.1f} %)"
    )


if __name__ == "__main__":
    main()
