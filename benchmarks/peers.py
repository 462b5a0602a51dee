"""The mesh against its peers (issue 29): its own cost per chat next to the LiteLLM proxy's, in
front of the same mock model server, measured in one run with the same client.

Starts, all on loopback:
  - a mock OpenAI-compatible model server (benchmarks/openai_mock.py: a bare asyncio HTTP/1.1
    server with prepared answers; `mock-8` answers 8 tokens, `mock-256` 256, no delay);
  - a mesh (tests/support/mesh.py; base port 5600) with both on `protocol: openai`, `server:
    openai`, response cache and router off, admission raised to let all 32 chats through at once
    (max_concurrent: 64, as LiteLLM does; the default queues beyond 4 and refuses beyond 20); then a second one (base 5700) with the router on and
    the routes' three model ids on the mock, for `model: "auto"`; then the first again with every
    service in its own process (`capibara up --split`, base 5800). supervision.mesh_nice is 0:
    there is no model server to protect, and every gateway and the client compete at one priority;
  - the LiteLLM proxy 1.110.2, one worker, production settings without a database
    (benchmarks/peers_litellm.py says which), in .venv-litellm, created on first use.

Measures, with wrk (HTTP/1.1 keep-alive; the mesh's TLS edge at /v1/chat/completions, LiteLLM's
plain HTTP port), interleaving the mesh's and LiteLLM's phases so both see the same machine:
  - at 32 in flight, 8-token chats: req/s, errors, p50/p99, and the CPU of every process of each
    gateway (mesh: Envoy, `capibara up` with the services in it, its children; LiteLLM: all of its
    processes), from /proc utime+stime, per chat and per process; wrk's own CPU is not counted;
  - one connection, one chat at a time: the p50 each gateway adds over the mock's own p50 (same
    client), for /v1, for the native /api/chat, and for a routed chat (`model: "auto"`) against a
    named one on the router mesh;
  - streaming: 256-token answers (stream: true, usage in the last chunk), CPU per token;
  - the same for the split mesh (shorter phases, no goals);
and prints every goal of issue 29 as MET / NOT MET with the raw numbers of this run. Turn 6's time
to first token with replica affinity comes from benchmarks/replica_affinity.py, where present.

    .venv/bin/python benchmarks/peers.py                 # everything (a few minutes; make bench)
    .venv/bin/python benchmarks/peers.py --quick         # mesh CPU/chat and req/s only (< 1 minute)
    .venv/bin/python benchmarks/peers.py --only cpu,litellm --seconds 10
    .venv/bin/python benchmarks/peers.py --quick --set services.event_loop=asyncio   # one setting's worth
    options: --seconds N (each load phase, default 6), --rounds N (each phase's runs, interleaved
             between the gateways, default 2), --skip-litellm, --skip-split, --skip-routed,
             --skip-affinity, --only SECTIONS (comma-separated: cpu, sequential, stream, routed,
             litellm, split, affinity; `mesh` = the first three, without LiteLLM), --set KEY=VALUE
             (a config value for every mesh, repeatable: services.local_calls=false)

A benchmark, not a test: it prints raw figures for this machine; on 2 cores, anything else running
moves them (the load average before and after is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import inspect
import io
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.peers_litellm import LiteLLM
from benchmarks.peers_load import LoadResult, wrk
from benchmarks.peers_report import Goal, Report, check_answer, print_report
from tests.support.mesh import mesh_config, running_mesh

MESH_BASE, ROUTED_BASE, SPLIT_BASE = 5600, 5700, 5800
MOCK_PORT, LITELLM_PORT = 5690, 5691
MOCK_URL = f"http://127.0.0.1:{MOCK_PORT}"
CHAT_TOKENS, STREAM_TOKENS = 8, 256
CHAT_MODEL, STREAM_MODEL = f"mock-{CHAT_TOKENS}", f"mock-{STREAM_TOKENS}"
IN_FLIGHT = 32
STREAM_IN_FLIGHT = 8
PROMPT = "Tell me one thing about capybaras."
SECTIONS = ("cpu", "sequential", "stream", "routed", "litellm", "split", "affinity")
ALIASES = {"mesh": ("cpu", "sequential", "stream")}  # --only mesh: the one-process mesh alone
PHASES = {"cpu", "sequential", "stream"}  # the load phases of a gateway; the rest: which gateways


def chat_body(model: str = CHAT_MODEL) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": CHAT_TOKENS}


def stream_body() -> dict:
    return {
        "model": STREAM_MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": STREAM_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def openai_model(model_name: str = "") -> dict:
    """A model on the mock. max_concurrent: all of a load phase's chats at the server at once, as
    LiteLLM sends them (the default, 4 at a time and 16 queued, answers the rest 429)."""
    backend = {"url": f"{MOCK_URL}/v1", "protocol": "openai", "server": "openai"}
    if model_name:
        backend["model_name"] = model_name
    return {"backend": backend, "max_concurrent": 2 * IN_FLIGHT}


def mesh_models(routed: bool) -> dict:
    if routed:  # the ids config/routes.yaml routes to, all on the mock's 8-token model
        return {name: openai_model(CHAT_MODEL) for name in ("gpt-oss-20b", "phi", "mixtral")}
    return {CHAT_MODEL: openai_model(), STREAM_MODEL: openai_model()}


@contextlib.contextmanager
def mock_upstream():
    argv = [sys.executable, str(pathlib.Path(__file__).with_name("openai_mock.py")), str(MOCK_PORT)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, start_new_session=True)
    try:
        line = process.stdout.readline()
        if not line.startswith(b"mock serving"):
            raise RuntimeError(f"the mock did not start: {line!r}")
        yield process
    finally:
        process.terminate()
        process.wait(10)


# Config values every mesh of the run gets (--set), to measure what one setting is worth.
OVERRIDES: dict[str, object] = {}


@contextlib.contextmanager
def mesh(directory: pathlib.Path, base: int, routed: bool = False, split: bool = False):
    where = directory / f"mesh-{base}"
    where.mkdir()
    models = mesh_models(routed)
    # Envoy's admin port within the base's hundred (mesh_config puts it at base + 901, which is
    # another base's edge port: 5600's admin would be 6500's edge).
    defaults = mesh_config(where / "state", base, models)
    edge = {**defaults["edge"], "admin_port": base + 99}
    sections = {"supervision": {"mesh_nice": 0}, "edge": edge}
    for dotted, value in OVERRIDES.items():  # --set: e.g. services.local_calls=false
        top, *path = dotted.split(".")
        section = sections.setdefault(top, dict(defaults.get(top) or {}))
        for key in path[:-1]:
            section = section.setdefault(key, {})
        section[path[-1]] = value
    with running_mesh(where, base, models, router=routed, split=split, **sections) as running:
        yield running


@dataclasses.dataclass
class Gateway:
    name: str
    url: str  # its root: /v1/chat/completions is below it
    pids: list[int]  # the roots of its process tree, for its CPU
    key: str = ""

    @property
    def chat_url(self) -> str:
        return self.url + "/v1/chat/completions"


class Bench:
    """The load phases, each a wrk run against one gateway; results land in self.report."""

    def __init__(self, args, directory: pathlib.Path):
        self.args, self.directory = args, directory
        # The load phases of each gateway: those named, else (--only litellm, say) all of them.
        self.phases = (args.sections & PHASES) or PHASES
        self.report = Report(sections=args.sections, seconds=args.seconds)

    def load(self, url: str, body: dict, seconds: float, connections: int, pids=None, key: str = "") -> LoadResult:
        return wrk(url, body, self.directory, seconds, connections, api_key=key, cpu_of=pids)

    def warm(self, url: str, body: dict, key: str = "") -> None:
        self.load(url, body, 3, IN_FLIGHT, key=key)

    def gateway_phases(self, gateways: list[Gateway], seconds: float, rounds: int) -> None:
        """Throughput + CPU, sequential, streaming: each phase for every gateway in turn, `rounds`
        times, so that each sees the machine as the others do (others' processes come and go)."""
        for gateway in gateways:
            check_answer(gateway.chat_url, chat_body(), gateway.key, CHAT_TOKENS)
            check_answer(gateway.chat_url, stream_body(), gateway.key, STREAM_TOKENS)
            self.warm(gateway.chat_url, chat_body(), gateway.key)
        phases = [
            ("chat", chat_body(), IN_FLIGHT),
            ("sequential", chat_body(), 1),
            ("stream", stream_body(), STREAM_IN_FLIGHT),
        ]
        for phase, body, in_flight in phases:
            if (phase if phase != "chat" else "cpu") not in self.phases:
                continue
            for _ in range(rounds):
                for g in gateways:
                    self.report.add(g.name, phase, self.load(g.chat_url, body, seconds, in_flight, g.pids, g.key))

    def run(self) -> None:
        args, sections = self.args, self.args.sections
        with mock_upstream():
            if sections - {"affinity"} and ("sequential" in self.phases or "routed" in sections):
                self.warm(MOCK_URL + "/v1/chat/completions", chat_body())
                mock = self.load(MOCK_URL + "/v1/chat/completions", chat_body(), args.seconds, 1)
                self.report.add("mock", "sequential", mock)
            litellm = None
            if "litellm" in sections:
                litellm = LiteLLM(self.directory, LITELLM_PORT, f"{MOCK_URL}/v1", [CHAT_MODEL, STREAM_MODEL])
                litellm.launch()
            try:
                with contextlib.ExitStack() as stack:
                    gateways = []
                    if sections & PHASES:
                        running = stack.enter_context(mesh(self.directory, MESH_BASE))
                        edge = f"https://127.0.0.1:{running.config['edge']['port']}"
                        gateways.append(Gateway("mesh", edge, [running.process.pid]))
                    if litellm:
                        litellm.wait_ready()
                        gateways.append(Gateway("LiteLLM", litellm.url, litellm.pids(), litellm.key))
                    self.gateway_phases(gateways, args.seconds, args.rounds)
                    if gateways and gateways[0].name == "mesh" and "sequential" in self.phases:
                        self.rest_phase(gateways[0])
            finally:
                if litellm:
                    litellm.stop()
            if "routed" in sections:
                with mesh(self.directory, ROUTED_BASE, routed=True) as running:
                    url = f"https://127.0.0.1:{running.config['edge']['port']}/v1/chat/completions"
                    models = (("named", "gpt-oss-20b"), ("auto", "auto"))
                    for _, model in models:
                        check_answer(url, chat_body(model), "", CHAT_TOKENS)
                        self.warm(url, chat_body(model))
                    for _ in range(args.rounds):
                        for label, model in models:
                            result = self.load(url, chat_body(model), args.seconds, 1)
                            self.report.add("routed mesh", f"sequential {label}", result)
            if "split" in sections:
                with mesh(self.directory, SPLIT_BASE, split=True) as running:
                    edge = f"https://127.0.0.1:{running.config['edge']['port']}"
                    self.gateway_phases([Gateway("split mesh", edge, [running.process.pid])], args.seconds / 2, 1)
        self.report.goals += affinity_goals(self.directory, args, self.report.notes)

    def rest_phase(self, mesh_gateway: Gateway) -> None:
        """The native REST /api/chat, one at a time."""
        url = mesh_gateway.url + "/api/chat"
        body = {"message": PROMPT, "model": CHAT_MODEL, "max_tokens": CHAT_TOKENS}
        check_answer(url, body, "", CHAT_TOKENS)
        for _ in range(self.args.rounds):
            self.report.add("mesh", "sequential /api/chat", self.load(url, body, self.args.seconds, 1))


# -- the hook for turn 6's time to first token (benchmarks/replica_affinity.py) ------------------


def affinity_goals(directory: pathlib.Path, args, notes: list[str]) -> list[Goal]:
    """Issue 29's cache-aware replicas goal, from benchmarks/replica_affinity.py when it exists:
    its `measure(directory)` (sync or async) returns a dict with "turn6_ttft_ms" ({"affinity": ms,
    "least_requests": ms}: turn 6's time to first token with affinity and with least-request
    balancing), or with "goals" (Goal, or (label, met, measured, target) tuples); what its
    `report(result)` prints, if it has one, goes to `notes`."""
    label = "turn 6 TTFT, least-request / affinity (2 replicas)"
    if args.skip_affinity:
        return [Goal(label, None, "skipped (--skip-affinity)", ">= 2.0x")]
    try:
        from benchmarks import replica_affinity  # noqa: PLC0415 - written separately, may be absent
    except ImportError:
        return [Goal(label, None, "not measured: no benchmarks/replica_affinity.py", ">= 2.0x")]
    where = directory / "affinity"
    try:
        result = replica_affinity.measure(where)
        if inspect.isawaitable(result):
            result = asyncio.run(result)
        if hasattr(replica_affinity, "report"):
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                replica_affinity.report(result)
            notes.append(printed.getvalue().rstrip())
        if "goals" in result:
            return [g if isinstance(g, Goal) else Goal(*g) for g in result["goals"]]
        ttft = result["turn6_ttft_ms"]
        affinity, balanced = ttft["affinity"], ttft["least_requests"]
    except Exception as exc:  # noqa: BLE001 - its failure is a line of the report, not the end of it
        notes.append(f"benchmarks/replica_affinity.py failed: {type(exc).__name__}: {exc}".rstrip())
        return [Goal(label, False, f"failed ({type(exc).__name__}: see above)", ">= 2.0x")]
    ratio = balanced / affinity if affinity else float("nan")
    return [Goal(label, ratio >= 2.0, f"{ratio:.2f}x ({balanced:.1f} / {affinity:.1f} ms)", ">= 2.0x")]


def load_average() -> str:
    return " ".join(pathlib.Path("/proc/loadavg").read_text().split()[:3])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="duration of each load phase (default 6)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="runs of each phase, interleaved between gateways (default 2)"
    )
    parser.add_argument("--only", help=f"comma-separated sections: {', '.join(SECTIONS)}; mesh = cpu,sequential,stream")
    parser.add_argument(
        "--quick", action="store_true", help="mesh CPU/chat and req/s only: 2 rounds of 5 s (< 1 minute)"
    )
    for section in ("litellm", "split", "routed", "affinity"):
        parser.add_argument(f"--skip-{section}", action="store_true")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config value for every mesh, YAML (e.g. services.event_loop=asyncio, services.local_calls=false)",
    )
    args = parser.parse_args(argv)
    for item in args.set:
        key, equals, value = item.partition("=")
        if not equals or not key:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        OVERRIDES[key] = yaml.safe_load(value)
    sections = set(SECTIONS)
    if args.only:
        named = [s.strip() for s in args.only.split(",")]
        sections = {section for name in named for section in ALIASES.get(name, (name,))}
        if unknown := sections - set(SECTIONS):
            parser.error(f"unknown sections {sorted(unknown)}: choose from {', '.join(SECTIONS)}, mesh")
    if args.quick:
        sections = {"cpu"}
        if args.seconds == parser.get_default("seconds"):
            args.seconds = 5.0
    for section in ("litellm", "split", "routed", "affinity"):
        if getattr(args, f"skip_{section}"):
            sections.discard(section)
    args.skip_affinity = "affinity" not in sections
    args.sections = sections
    return args


def main() -> None:
    args = parse_args()
    started, load_before = time.time(), load_average()
    commit = subprocess.run(["git", "log", "--oneline", "-1"], capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        bench = Bench(args, pathlib.Path(tmp))
        bench.run()
    header = (
        f"peers.py: {platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"at {commit[:60] or '?'}{' (uncommitted changes in the tree)' if dirty() else ''}"
        f"{''.join(f'; {k}={v}' for k, v in OVERRIDES.items())}; load average before "
        f"{load_before}, after {load_average()}; {time.time() - started:.0f} s"
    )
    print_report(bench.report, header, IN_FLIGHT, STREAM_IN_FLIGHT, STREAM_TOKENS)


def dirty() -> bool:
    done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return bool(done.stdout.strip())


if __name__ == "__main__":
    main()
