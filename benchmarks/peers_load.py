"""Load and CPU accounting for benchmarks/peers.py: one client (wrk) for every gateway, and the
CPU that every process of a gateway spent while it ran.

wrk (HTTP/1.1, keep-alive, https or http) is the same client for the mesh's TLS edge and for
LiteLLM's plain HTTP port; a Lua script gives it the POST body and reports its figures as JSON
(latency percentiles in microseconds, non-2xx answers and socket errors). Its own CPU is not
counted: only the processes of the gateway under test (a process tree, read from /proc).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess

CLOCK_TICK = os.sysconf("SC_CLK_TCK")

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
{auth}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {{"requests":%d,"duration_us":%d,"non2xx":%d,"connect":%d,"read":%d,"write":%d,"timeout":%d,'
    .. '"bytes":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f}}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
"""


def lua_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclasses.dataclass
class LoadResult:
    requests: int
    seconds: float
    errors: int  # non-2xx answers and socket errors (connect, read, write, timeout)
    error_kinds: dict[str, int]
    bytes_per_answer: float  # all answers' bytes (headers included) / answers: a cut answer shows
    p50_ms: float
    p90_ms: float
    p99_ms: float
    cpu_s: dict[str, float] = dataclasses.field(default_factory=dict)  # process label -> CPU seconds

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_total_s(self) -> float:
        return sum(self.cpu_s.values())

    def cpu_us_per(self, units: float) -> float:
        return self.cpu_total_s / units * 1e6 if units else float("nan")


def wrk(
    url: str,
    body: dict,
    directory: pathlib.Path,
    seconds: float,
    connections: int,
    api_key: str = "",
    cpu_of: list[int] | None = None,
    labels: dict[int, str] | None = None,
) -> LoadResult:
    """wrk for `seconds` with `connections` connections, each one request in flight at a time,
    POSTing `body` to `url`; with `cpu_of` (root pids), the CPU of those processes and all their
    descendants over the run."""
    auth = f'wrk.headers["Authorization"] = {lua_string("Bearer " + api_key)}' if api_key else ""
    script = directory / "wrk_post.lua"
    script.write_text(WRK_SCRIPT.format(body=lua_string(json.dumps(body)), auth=auth))
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s"]
    argv += ["-s", str(script), url]
    before = tree_cpu(cpu_of) if cpu_of else {}
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    after = tree_cpu(cpu_of) if cpu_of else {}
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no figures ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    figures = json.loads(line.split(" ", 1)[1])
    errors = sum(figures[k] for k in ("non2xx", "connect", "read", "write", "timeout"))
    result = LoadResult(
        requests=figures["requests"] - figures["non2xx"],
        seconds=figures["duration_us"] / 1e6,
        errors=errors,
        error_kinds={k: figures[k] for k in ("non2xx", "connect", "read", "write", "timeout") if figures[k]},
        bytes_per_answer=figures["bytes"] / max(figures["requests"], 1),
        p50_ms=figures["p50_us"] / 1000,
        p90_ms=figures["p90_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
    )
    for pid, (name, seconds_after) in after.items():
        label = (labels or {}).get(pid) or f"{name} [{pid}]"
        spent = seconds_after - before.get(pid, (name, 0.0))[1]
        result.cpu_s[label] = result.cpu_s.get(label, 0.0) + spent
    return result


# -- CPU of process trees ----------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (index 0 = state, 1 = ppid, 11 utime, 12 stime,
    13 cutime, 14 cstime), None once gone."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def descendants(roots: list[int]) -> list[int]:
    """`roots` and every process below them."""
    children: dict[int, list[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.append(pid)
            todo += children.get(pid, [])
    return found


def process_name(pid: int) -> str:
    """A short label from the command line: `capibara up`, `capibara serve gateway`, envoy, ..."""
    try:
        argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    argv = [a for a in argv if a]
    words = [pathlib.Path(a).name if i == 0 or "/" in a else a for i, a in enumerate(argv)]
    capibara = "capibara" in words or "capibara_grpc.cli" in words
    if capibara and "serve" in words[:-1]:
        return "capibara serve " + words[words.index("serve") + 1]
    if capibara and "up" in words:
        return "capibara up"
    if "-m" in words[:-1]:
        return ".".join(words[words.index("-m") + 1].split(".")[-2:])
    if words and words[0].startswith("python") and len(words) > 1:
        return words[1]
    return words[0] if words else "?"


def tree_cpu(roots: list[int]) -> dict[int, tuple[str, float]]:
    """pid -> (name, user + system CPU seconds, its reaped children's included) for `roots` and
    their descendants."""
    cpu = {}
    for pid in descendants(roots):
        fields = _stat(pid)
        if fields:
            ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
            cpu[pid] = (process_name(pid), ticks / CLOCK_TICK)
    return cpu
