"""What benchmarks/peers.py prints: each load phase's figures, each process's CPU, the sequential
overheads, and issue 29's goals as MET / NOT MET with the numbers they come from. Also the check
that a gateway answers the whole answer before it is loaded (a gateway that fails fast would
otherwise look fast)."""

from __future__ import annotations

import dataclasses
import json
import ssl
import statistics
import urllib.request

from benchmarks.peers_load import LoadResult

CPU_PER_CHAT_GOAL_US = 1000
SEQUENTIAL_GOAL_MS = 1.0
ROUTED_GOAL_MS = 0.5
THROUGHPUT_GOAL_RATIO = 6.0
STREAM_GOAL_RATIO = 0.5


@dataclasses.dataclass
class Goal:
    label: str
    met: bool | None  # None: reported, not judged (or not measured in this run)
    measured: str
    target: str


@dataclasses.dataclass
class Report:
    sections: set[str]
    seconds: float
    results: dict[tuple[str, str], list[LoadResult]] = dataclasses.field(default_factory=dict)
    goals: list[Goal] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)  # more figures, printed before the goals

    def add(self, gateway: str, phase: str, result: LoadResult) -> None:
        self.results.setdefault((gateway, phase), []).append(result)
        print(
            f"  {gateway:12} {phase:22} {result.rps:8.1f} req/s  p50 {result.p50_ms:7.2f} ms  "
            f"p99 {result.p99_ms:7.2f} ms  errors {result.errors} {result.error_kinds or ''}",
            flush=True,
        )

    def get(self, gateway: str, phase: str) -> LoadResult | None:
        """A phase's rounds pooled: their chats, seconds and CPU summed, their percentiles' median."""
        rounds = self.results.get((gateway, phase))
        return pooled(rounds) if rounds else None

    def spread(self, gateway: str, phase: str, figure) -> str:
        """(min-max of figure(round)) when the phase ran more than once, else ''."""
        rounds = self.results.get((gateway, phase)) or []
        if len(rounds) < 2:
            return ""
        values = [figure(r) for r in rounds]
        return f" [rounds {min(values):.0f}-{max(values):.0f}]"


def pooled(rounds: list[LoadResult]) -> LoadResult:
    if len(rounds) == 1:
        return rounds[0]
    cpu: dict[str, float] = {}
    kinds: dict[str, int] = {}
    for r in rounds:
        for label, seconds in r.cpu_s.items():
            cpu[label] = cpu.get(label, 0.0) + seconds
        for kind, n in r.error_kinds.items():
            kinds[kind] = kinds.get(kind, 0) + n
    requests = sum(r.requests for r in rounds)
    return LoadResult(
        requests=requests,
        seconds=sum(r.seconds for r in rounds),
        errors=sum(r.errors for r in rounds),
        error_kinds=kinds,
        bytes_per_answer=sum(r.bytes_per_answer * r.requests for r in rounds) / max(requests, 1),
        p50_ms=statistics.median(r.p50_ms for r in rounds),
        p90_ms=statistics.median(r.p90_ms for r in rounds),
        p99_ms=statistics.median(r.p99_ms for r in rounds),
        cpu_s=cpu,
    )


# -- the answer check ---------------------------------------------------------------------------


def check_answer(url: str, body: dict, key: str, tokens: int) -> None:
    """One request: RuntimeError unless it is a 200 whose answer has `tokens` words (the mock's
    tokens are one word each), streamed or not, /v1 or /api/chat."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    with urllib.request.urlopen(request, context=context, timeout=30) as response:
        payload = response.read().decode()
    if body.get("stream"):
        text, usage = "", None
        for line in payload.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                for choice in event.get("choices") or []:
                    text += (choice.get("delta") or {}).get("content") or ""
                usage = event.get("usage") or usage
        if not payload.rstrip().endswith("data: [DONE]") or not usage:
            raise RuntimeError(f"{url}: the stream did not end with usage and [DONE]:\n{payload[-1000:]}")
    else:
        answer = json.loads(payload)
        text = answer["choices"][0]["message"]["content"] if "choices" in answer else answer["response"]
    if len(text.split()) != tokens:
        raise RuntimeError(f"{url}: {len(text.split())} words, not {tokens}:\n{payload[-1000:]}")


# -- the report ---------------------------------------------------------------------------------


def print_report(report: Report, header: str, in_flight: int, stream_in_flight: int, stream_tokens: int) -> None:
    print("\n" + header)
    print(
        f"\n{'gateway':12} {'phase':22} {'in flight':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
        f" {'B/answer':>8} {'CPU us/unit':>15}"
    )
    flights = {"chat": in_flight, "stream": stream_in_flight}
    for (gateway, phase), rounds in report.results.items():
        for r in rounds:
            units = r.requests * (stream_tokens if phase == "stream" else 1)
            cpu = f"{r.cpu_us_per(units):.1f} /{'token' if phase == 'stream' else 'chat'}" if r.cpu_s else ""
            print(
                f"{gateway:12} {phase:22} {flights.get(phase, 1):9d} {r.rps:8.1f} {r.p50_ms:8.2f} {r.p99_ms:8.2f}"
                f" {r.errors:6d} {r.bytes_per_answer:8.0f} {cpu:>15}"
            )
    print("\nCPU of each process, all rounds (microseconds per chat; per token for streams):")
    for gateway, phase in report.results:
        r = report.get(gateway, phase)
        units = r.requests * (stream_tokens if phase == "stream" else 1)
        if not r.cpu_s or phase.startswith("sequential") or not units:
            continue
        ordered = sorted(r.cpu_s.items(), key=lambda x: -x[1])
        parts = ", ".join(f"{label} {seconds / units * 1e6:.1f}" for label, seconds in ordered)
        print(f"  {gateway} {phase}: total {r.cpu_us_per(units):.1f} = {parts}")
    print_overheads(report)
    for note in report.notes:
        print("\n" + note)
    goals = issue_goals(report, stream_tokens) + report.goals
    print(f"\n{'goal (issue 29)':58} {'verdict':>9}  {'measured':44} target")
    for goal in goals:
        verdict = {True: "MET", False: "NOT MET", None: "-"}[goal.met]
        print(f"{goal.label:58} {verdict:>9}  {goal.measured:44} {goal.target}")


def overhead(report: Report, gateway: str, phase: str) -> float | None:
    mock, r = report.get("mock", "sequential"), report.get(gateway, phase)
    return r.p50_ms - mock.p50_ms if mock and r else None


def print_overheads(report: Report) -> None:
    mock = report.get("mock", "sequential")
    if not mock:
        return
    print(
        f"\nsequential (1 connection, 1 in flight), p50 added over the mock's own p50 ({mock.p50_ms:.3f} ms, same client):"
    )
    for gateway, phase in (
        ("mesh", "sequential"),
        ("mesh", "sequential /api/chat"),
        ("LiteLLM", "sequential"),
        ("routed mesh", "sequential named"),
        ("routed mesh", "sequential auto"),
        ("split mesh", "sequential"),
    ):
        added = overhead(report, gateway, phase)
        if added is not None:
            print(f"  {gateway + ' ' + phase:40} {added:7.3f} ms")


def issue_goals(report: Report, stream_tokens: int) -> list[Goal]:
    goals = []
    mesh, litellm = report.get("mesh", "chat"), report.get("LiteLLM", "chat")
    if mesh:
        cpu = mesh.cpu_us_per(mesh.requests)
        goals.append(
            Goal(
                "CPU of all mesh processes per chat (named, /v1, 32 in flight)",
                cpu <= CPU_PER_CHAT_GOAL_US,
                f"{cpu:.0f} us ({mesh.cpu_total_s:.2f} s / {mesh.requests} chats)"
                + report.spread("mesh", "chat", lambda r: r.cpu_us_per(r.requests)),
                f"<= {CPU_PER_CHAT_GOAL_US} us",
            )
        )
    if litellm:
        spread = report.spread("LiteLLM", "chat", lambda r: r.cpu_us_per(r.requests))
        goals.append(
            Goal("  LiteLLM's, same phase", None, f"{litellm.cpu_us_per(litellm.requests):.0f} us{spread}", "")
        )
    added = overhead(report, "mesh", "sequential")
    if added is not None:
        goals.append(
            Goal(
                "sequential overhead p50 over the bare upstream (/v1)",
                added <= SEQUENTIAL_GOAL_MS,
                f"{added:.3f} ms",
                f"<= {SEQUENTIAL_GOAL_MS} ms",
            )
        )
    for gateway, phase, label in (
        ("mesh", "sequential /api/chat", "  same, native REST /api/chat"),
        ("routed mesh", "sequential auto", "  same, routed chat (model: auto)"),
        ("LiteLLM", "sequential", "  same, LiteLLM"),
    ):
        added = overhead(report, gateway, phase)
        if added is not None:
            goals.append(Goal(label, None, f"{added:.3f} ms", ""))
    named, auto = report.get("routed mesh", "sequential named"), report.get("routed mesh", "sequential auto")
    if named and auto:
        extra = auto.p50_ms - named.p50_ms
        goals.append(
            Goal(
                "routed chat adds over a named one (p50, router on)",
                extra <= ROUTED_GOAL_MS,
                f"{extra:.3f} ms ({auto.p50_ms:.3f} - {named.p50_ms:.3f})",
                f"<= {ROUTED_GOAL_MS} ms",
            )
        )
    if mesh and litellm:
        ratio = mesh.rps / litellm.rps if litellm.rps else float("inf")
        goals.append(
            Goal(
                "throughput at 32 in flight, mesh / LiteLLM, no errors",
                ratio >= THROUGHPUT_GOAL_RATIO and mesh.errors == 0,
                f"{ratio:.2f}x ({mesh.rps:.0f} / {litellm.rps:.0f} req/s), errors {mesh.errors}/{litellm.errors}"
                + report.spread("mesh", "chat", lambda r: r.rps)
                + report.spread("LiteLLM", "chat", lambda r: r.rps),
                f">= {THROUGHPUT_GOAL_RATIO:g}x, 0 errors",
            )
        )
        goals.append(
            Goal("  p99 at 32 in flight, mesh / LiteLLM", None, f"{mesh.p99_ms:.1f} / {litellm.p99_ms:.1f} ms", "")
        )
    elif mesh:
        goals.append(
            Goal(
                "throughput at 32 in flight (no LiteLLM in this run)",
                None,
                f"{mesh.rps:.0f} req/s, p99 {mesh.p99_ms:.1f} ms, errors {mesh.errors}",
                "",
            )
        )
    stream_mesh, stream_litellm = report.get("mesh", "stream"), report.get("LiteLLM", "stream")
    if stream_mesh:
        mesh_token = stream_mesh.cpu_us_per(stream_mesh.requests * stream_tokens)
        if stream_litellm:
            litellm_token = stream_litellm.cpu_us_per(stream_litellm.requests * stream_tokens)
            ratio = mesh_token / litellm_token
            goals.append(
                Goal(
                    f"streaming CPU per token ({stream_tokens} tokens), mesh / LiteLLM",
                    ratio <= STREAM_GOAL_RATIO and stream_mesh.errors == 0,
                    f"{ratio:.2f} ({mesh_token:.1f} / {litellm_token:.1f} us)",
                    f"<= {STREAM_GOAL_RATIO}",
                )
            )
        else:
            goals.append(Goal("streaming CPU per token (no LiteLLM in this run)", None, f"{mesh_token:.1f} us", ""))
    split = report.get("split mesh", "chat")
    if split:
        stream = report.get("split mesh", "stream")
        per_token = f", {stream.cpu_us_per(stream.requests * stream_tokens):.1f} us/token" if stream else ""
        goals.append(
            Goal(
                "split mode (reported, no goal): CPU/chat, req/s",
                None,
                f"{split.cpu_us_per(split.requests):.0f} us, {split.rps:.0f} req/s{per_token}",
                "",
            )
        )
    return goals
