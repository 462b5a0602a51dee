"""The mesh's own overhead, each figure as a ratio to its ceiling measured in the same run.

Starts a mesh (ports 33xxx, router and context on; one llama-server on the shipped SmolLM2 that
serves the three model ids of config/routes.yaml), a no-op grpc.aio service in its own process,
and a second Envoy built by the mesh's own builder (capibara_grpc.edge.envoy_config.build) from
the mesh's config, with one extra route and cluster for the no-op service; both as nice as the
mesh's own processes (supervision.mesh_nice). Then:

  1. no-op direct, no-op via the edge, Route direct, Route via the edge: h2load, 4 connections x 16
     streams, one repeated 29-byte request (h2load sends one body);
  2. Route via the edge with distinct queries (the 395 texts of the router's evaluation sets,
     cycled): h2load cannot vary the body, so a load generator in its own process
     (benchmarks/grpc_load.mjs, Node's built-in http2), 64 in flight over 4 connections, against
     the no-op through the same Envoy with the same generator, with the CPU each process spent
     per call; and Route p50 at concurrency 1;
  3. chat time to first token (REST SSE through the edge, router and context on, temperature 0)
     against llama-server given the same final prompt (the context service's Enrich), and given
     the bare prompt: mesh processing and extra prompt tokens apart (benchmarks/mesh_chat.py);
  4. chat tokens/s alone and while the generator offers Route at half the no-op ceiling,
     interleaved chat by chat, with llama-server's own speed and the Route rate served meanwhile;
  5. consensus (vote, three candidates): from the last CandidateFinished to the FinalAnswer.

    .venv/bin/python benchmarks/mesh_overhead.py [--seconds 8] [--chat-runs 10] [--split]
        [--direct] [--mesh-nice N]

A benchmark, not a test: it prints raw figures and ratios for this machine (about 2 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks import mesh_load
from benchmarks.mesh_chat import ROUTE_METHOD, consensus_gaps, measure_chat, tokens_per_s_under_load
from benchmarks.mesh_load import NOOP_METHOD, grpc_frame, load_process, load_result
from capibara_grpc.config import load_config
from capibara_grpc.edge import envoy_config
from capibara_grpc.edge.clusters import service_cluster, socket_address
from capibara_grpc.edge.tls import ensure_certificate
from capibara_grpc.stubs import (
    router_pb2,
)
from capibara_grpc.supervision.launch_commands import envoy_argv
from capibara_grpc.supervision.priority import start_nicer, stat_fields
from tests.support.mesh import launched_model, mesh_config, running_mesh

BASE = 33000
NOOP_PORT, BENCH_EDGE_PORT, BENCH_ADMIN_PORT = BASE + 40, BASE + 41, BASE + 42
QUERY = "¿Cuánto es 17 por 23?"  # 29 bytes as a RouteRequest, as in the issue
STREAMS = 16  # per connection (mesh_load.CONNECTIONS)


def bench_envoy_yaml(mesh, directory: pathlib.Path) -> pathlib.Path:
    """The mesh's own Envoy bootstrap (same builder, same config) on other ports, with one more
    route and cluster: the no-op service."""
    config = load_config(mesh.config_path)
    cert, key = ensure_certificate(config)
    bootstrap = envoy_config.build(config, config.state_path / "envoy" / "capibara.pb", cert, key)
    bootstrap["admin"]["address"] = socket_address("127.0.0.1", BENCH_ADMIN_PORT)
    listeners = bootstrap["static_resources"]["listeners"]
    edge = next(listener for listener in listeners if listener["name"] == "edge")
    edge["address"] = socket_address("127.0.0.1", BENCH_EDGE_PORT)
    bootstrap["static_resources"]["listeners"] = [edge]  # the mesh's Envoy keeps the internal ones
    hcm = edge["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    routes.insert(0, {"match": {"prefix": "/capibara.bench.v1.Noop/"}, "route": {"cluster": "noop", "timeout": "10s"}})
    noop = service_cluster("router", [("127.0.0.1", NOOP_PORT)])
    noop["name"] = noop["load_assignment"]["cluster_name"] = "noop"
    noop["health_checks"][0]["grpc_health_check"]["service_name"] = ""
    bootstrap["static_resources"]["clusters"].append(noop)
    path = directory / "bench-envoy.yaml"
    path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    return path


def wait_for(check, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} did not come up")


# -- CPU per call ------------------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process (all its threads)."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_cpu(run, pids: dict[str, int]) -> dict:
    """run() -> the generator's result, plus CPU microseconds per call of each named process and of
    the generator (its own figure, over its measured window only)."""
    before = {name: cpu_s(pid) for name, pid in pids.items()}
    result = run()
    calls = max(result["ok"], 1)
    cpu = {name: cpu_s(pid) - before[name] for name, pid in pids.items()}
    cpu["generator"] = result["cpu_s"]
    result["cpu_us"] = {name: seconds / calls * 1e6 for name, seconds in cpu.items()}
    return result


# -- h2load ------------------------------------------------------------------------------------


def h2load(url: str, body: bytes, directory: pathlib.Path, seconds: float, extra: list[str] | None = None) -> dict:
    frame = directory / "body.bin"
    frame.write_bytes(grpc_frame(body))
    log = directory / "h2load.log"
    log.unlink(missing_ok=True)
    argv = ["h2load", "-D", str(int(seconds)), "-c", str(mesh_load.CONNECTIONS), "-m", str(STREAMS), "-t", "1"]
    argv += ["-d", str(frame), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    argv += ["--log-file", str(log), *(extra or []), url]
    subprocess.run(argv, check=True, capture_output=True, text=True)
    rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    ok = sorted(int(r[2]) / 1000 for r in rows if r[1] == "200")
    return {
        "rps": len(ok) / seconds,
        "p50": statistics.median(ok) if ok else float("nan"),
        "errors": len(rows) - len(ok),
    }


# -- the report --------------------------------------------------------------------------------


def load_average() -> str:
    return " ".join(pathlib.Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each throughput run")
    parser.add_argument("--chat-runs", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--consensus-runs", type=int, default=5)
    parser.add_argument("--split", action="store_true", help="every service in its own process (capibara up --split)")
    parser.add_argument(
        "--direct",
        action="store_true",
        help="services call each other directly, not through Envoy (services.via_envoy: false)",
    )
    parser.add_argument(
        "--mesh-nice", type=int, help="supervision.mesh_nice of the mesh (default: the config's default, 5)"
    )
    args = parser.parse_args()
    if not shutil.which("h2load"):
        raise SystemExit("h2load is missing: `make bench` installs it (Debian package nghttp2-client)")
    started = time.time()
    load_before = load_average()
    models = {
        "gpt-oss-20b": launched_model(BASE + 80, parallel=4),
        # The routes' other model ids on the same llama-server: one process on 2 cores.
        "phi": {"backend": {"url": f"http://127.0.0.1:{BASE + 80}"}},
        "mixtral": {"backend": {"url": f"http://127.0.0.1:{BASE + 80}"}},
    }
    sections = {}
    if args.mesh_nice is not None:
        sections["supervision"] = {"mesh_nice": args.mesh_nice}
    if args.direct:
        services = mesh_config(pathlib.Path("unused"), BASE, models)["services"]
        sections["services"] = {**services, "via_envoy": False}
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_mesh(pathlib.Path(tmp), BASE, models, split=args.split, **sections) as mesh,
    ):
        directory = pathlib.Path(tmp)
        # The no-op ceiling and the bench Envoy run as the mesh's own processes do: as nice
        # (supervision.mesh_nice), each in a session (scheduling group) of its own.
        nice = load_config(mesh.config_path).supervision.mesh_nice
        noop = start_nicer([sys.executable, mesh_load.__file__, "noop", str(NOOP_PORT)], nice, stdout=subprocess.PIPE)
        envoy_log = open(directory / "bench-envoy.log", "wb")  # noqa: SIM115 - closed below
        envoy = start_nicer(
            envoy_argv(bench_envoy_yaml(mesh, directory)), nice, stdout=envoy_log, stderr=subprocess.STDOUT
        )
        try:
            assert noop.stdout.readline().startswith(b"noop serving")
            admin = f"http://127.0.0.1:{BENCH_ADMIN_PORT}"
            wait_for(
                lambda: (
                    "LIVE" in subprocess.run(["curl", "-s", admin + "/ready"], capture_output=True, text=True).stdout
                ),
                "bench Envoy",
            )
            time.sleep(2.5)  # first health checks of the no-op cluster
            report = run_all(mesh, directory, args, noop.pid, envoy.pid)
        finally:
            for process in (envoy, noop):
                process.terminate()
                process.wait(10)
            envoy_log.close()
    print_report(report, args, load_before, time.time() - started)


def run_all(mesh, directory: pathlib.Path, args, noop_pid: int, bench_envoy_pid: int) -> dict:
    s = args.seconds
    edge = f"https://localhost:{BENCH_EDGE_PORT}"
    router = mesh.service_address("router")
    route_body = router_pb2.RouteRequest(query=QUERY).SerializeToString()
    # The process that serves Route: `capibara up` itself, or with --split its router process.
    router_pid = mesh.service_pid("router") if args.split else mesh.process.pid
    r: dict = {}
    r["noop_direct"] = h2load(f"http://127.0.0.1:{NOOP_PORT}{NOOP_METHOD}", route_body, directory, s)
    r["noop_edge"] = h2load(edge + NOOP_METHOD, route_body, directory, s)
    r["route_direct"] = h2load(f"http://{router}{ROUTE_METHOD}", route_body, directory, s)
    r["route_edge"] = h2load(edge + ROUTE_METHOD, route_body, directory, s)
    cert = str(mesh.cert)
    bench_edge = f"127.0.0.1:{BENCH_EDGE_PORT}"
    pids = {"Envoy": bench_envoy_pid}
    r["gen_noop_edge"] = with_cpu(
        lambda: load_result(load_process(bench_edge, NOOP_METHOD, s, 64, cert)),
        {**pids, "service": noop_pid},
    )
    r["gen_route_edge"] = with_cpu(
        lambda: load_result(load_process(bench_edge, ROUTE_METHOD, s, 64, cert)),
        {**pids, "service": router_pid},
    )
    r["gen_route_edge_c1"] = load_result(load_process(bench_edge, ROUTE_METHOD, s / 2, 1, cert))
    r["chat"] = asyncio.run(measure_chat(mesh, args.chat_runs, args.max_tokens))
    goal_rate = 0.5 * r["noop_edge"]["rps"]
    r.update(tokens_per_s_under_load(mesh, bench_edge, cert, goal_rate, 2 * args.chat_runs, args.max_tokens))
    r["consensus_gaps"] = asyncio.run(consensus_gaps(mesh, args.consensus_runs))
    return r


def print_report(r: dict, args, load_before: str, wall_s: float) -> None:
    med = statistics.median
    print(
        f"\nmesh_overhead.py: {platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{'split: one process per service' if args.split else 'services in one process'}; "
        f"{'services call each other directly' if args.direct else 'services call each other through Envoy'}; "
        f"load average before {load_before}, after {load_average()}; {wall_s:.0f} s"
    )
    print(
        f"\n{'unary throughput (' + str(mesh_load.CONNECTIONS) + ' conn x ' + str(STREAMS) + ' streams, ' + str(args.seconds) + ' s)':58} {'req/s':>8} {'p50 ms':>8} {'errors':>7}"
    )
    rows = [
        ("no-op grpc.aio, direct (h2load)", r["noop_direct"]),
        ("no-op grpc.aio, via the edge (h2load)", r["noop_edge"]),
        ("Route, one query, direct (h2load)", r["route_direct"]),
        ("Route, one query, via the edge (h2load)", r["route_edge"]),
        ("no-op, via the edge (generator, 64 in flight)", r["gen_noop_edge"]),
        ("Route, distinct queries, via the edge (generator, 64)", r["gen_route_edge"]),
        ("Route, distinct queries, via the edge, concurrency 1", r["gen_route_edge_c1"]),
    ]
    for label, row in rows:
        print(f"{label:58} {row['rps']:8.0f} {row['p50']:8.2f} {row['errors']:7d}")
    goal_rate = 0.5 * r["noop_edge"]["rps"]
    print(f"\nCPU per call, microseconds (generator, 64 in flight); cores the goal rate ({goal_rate:.0f}/s) needs:")
    for label, row in (("no-op", r["gen_noop_edge"]), ("Route, distinct", r["gen_route_edge"])):
        cpu = row["cpu_us"]
        served = (cpu["service"] + cpu["Envoy"]) * goal_rate / 1e6
        print(
            f"  {label:16} service {cpu['service']:6.0f}  Envoy {cpu['Envoy']:6.0f}  generator {cpu['generator']:6.0f}"
            f"  -> service + Envoy {served:.2f} cores, + generator {cpu['generator'] * goal_rate / 1e6:.2f}"
            f" (this machine: {os.cpu_count()})"
        )
    chat = r["chat"]
    bare, final, mesh_ttft = (med(chat[k]) * 1000 for k in ("direct_bare", "direct_final", "mesh"))
    alone, loaded = med(r["tps_alone"]), med(r["tps_loaded"])
    gaps, bounds = r["consensus_gaps"]
    ceiling = r["noop_edge"]["rps"]
    print(f"\nchat, REST SSE via the edge, {args.max_tokens} tokens, temperature 0, {args.chat_runs} runs (p50):")
    print(f"  llama-server direct, bare prompt            TTFT {bare:7.1f} ms")
    print(f"  llama-server direct, the mesh's final prompt TTFT {final:7.1f} ms  ({chat['final_prompt_chars']} chars)")
    print(f"  mesh, routed + enriched                      TTFT {mesh_ttft:7.1f} ms")
    print(
        f"  chat tokens/s alone {alone:.1f}; under routing load {loaded:.1f} ({len(r['tps_loaded'])} chats; Route "
        f"offered {r['goal_rate']:.0f}/s = half the no-op ceiling, served about {r['served']:.0f}/s; interleaved)"
    )
    if r["backend_alone"] and r["backend_loaded"]:
        print(
            f"  llama-server's own tokens/s (its timings) alone {med(r['backend_alone']):.1f}; "
            f"under routing load {med(r['backend_loaded']):.1f}"
        )
    print(
        f"  consensus vote of 3: last CandidateFinished -> FinalAnswer p50 {med(gaps):.1f} ms (max {max(gaps):.1f}); "
        f"whole call less the slowest candidate p50 {med(bounds):.1f} ms (max {max(bounds):.1f})"
    )
    print(f"\n{'goal':62} {'measured':>10} {'target':>8}")
    goals = [
        (
            "Route (distinct, generator) / no-op ceiling via the same Envoy",
            r["gen_route_edge"]["rps"] / ceiling,
            ">= 0.50",
        ),
        (
            "  same, generator's own no-op via the edge as the ceiling",
            r["gen_route_edge"]["rps"] / r["gen_noop_edge"]["rps"],
            ">= 0.50",
        ),
        ("Route (one query, h2load) / no-op via the edge (h2load)", r["route_edge"]["rps"] / ceiling, ""),
        ("no-op via the edge / no-op direct", ceiling / r["noop_direct"]["rps"], ""),
        ("Route p50 at concurrency 1, ms", r["gen_route_edge_c1"]["p50"], "<= 5"),
        ("chat TTFT added by the mesh's processing, ms", mesh_ttft - final, "<= 10"),
        ("chat TTFT added by the extra prompt tokens, ms", final - bare, ""),
        ("chat tokens/s slowdown under routing load", 1 - loaded / alone, "< 0.05"),
        ("consensus last candidate finished -> decision p50, ms", med(gaps), "<= 30"),
        ("  upper bound: call less the slowest candidate, p50 ms", med(bounds), "<= 30"),
    ]
    for label, value, target in goals:
        print(f"{label:62} {value:10.2f} {target:>8}")


if __name__ == "__main__":
    main()
