"""CPU priority: model servers first.

`capibara up` runs the mesh's own work (its services, in its own process or in `capibara serve`
children, and Envoy) `supervision.mesh_nice` levels nicer than the model servers it launches. When
every core is busy (a burst of routing, a load test from the same host) the kernel then gives
the CPU to token generation first, and routing and relaying wait. Measured on 2 cores: a
llama-server with one thread kept its full speed beside three busy processes 5 levels nicer, and
half of it beside three at its own level (docs/benchmarks.md, "Model servers first, and where
Route's CPU goes").

Two kernel settings, both only ever raised, never lowered (which needs no privilege):
- a thread's nice value, which orders threads within one scheduling group. Linux keeps it per
  thread and a new thread or child process inherits its creator's, so `capibara up` starts every
  child from one thread kept at the priority it was started with (`Spawner`) and lowers all its
  other threads;
- where the kernel groups processes by session (autogroup, on by default on most distributions),
  the session group's nice value, which orders the groups: every child has a session of its own,
  so each is its own group, and a nice value inside a group would not count against the others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import pathlib
import subprocess
import threading
import time

log = logging.getLogger(__name__)

# Writes to an autogroup's nice value are limited to one every 100 ms across the whole system.
_AUTOGROUP_TRIES = 10


def autogroup_enabled() -> bool:
    try:
        return pathlib.Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return False


def autogroup_nice(pid: int | str = "self") -> int | None:
    """The nice value of the session group of process `pid` ('/autogroup-42 nice 5'), None
    without autogroup."""
    try:
        return int(pathlib.Path(f"/proc/{pid}/autogroup").read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def lower_session_group(pid: int | str, nice: int) -> bool:
    """Raise the nice value of `pid`'s session group (a process of ours that leads its own
    session) to `nice`, never lower it; False where the kernel has no autogroup or refused
    (logged: the process then competes at its group's old priority)."""
    current = autogroup_nice(pid)
    if current is None:
        return False
    if current >= nice:
        return True
    path = pathlib.Path(f"/proc/{pid}/autogroup")
    for _ in range(_AUTOGROUP_TRIES):
        try:
            path.write_text(str(nice))
            return True
        except BlockingIOError:  # EAGAIN: another write in the last 100 ms
            time.sleep(0.1)
        except OSError as exc:
            log.warning("could not lower the scheduling group of process %s: %s", pid, exc)
            return False
    log.warning("could not lower the scheduling group of process %s: the kernel kept refusing (EAGAIN)", pid)
    return False


def start_nicer(argv: list[str], nice: int, **popen) -> subprocess.Popen:
    """Start `argv` in a session of its own, `nice` levels nicer than the thread that starts it
    (coreutils' nice), its session group lowered to match (lower_session_group)."""
    process = subprocess.Popen(["nice", "-n", str(nice), *argv] if nice > 0 else argv, start_new_session=True, **popen)
    if nice > 0:
        lower_session_group(process.pid, nice)
    return process


def stat_fields(tid: int | str) -> list[str]:
    """/proc/<tid>/stat after the command name: index 0 is field 3 (state), 11 utime, 12 stime,
    16 nice."""
    return pathlib.Path(f"/proc/{tid}/stat").read_text().rsplit(")", 1)[1].split()


def thread_nice(tid: int | str) -> int:
    """The nice value of one thread (or, given a process id, of its main thread)."""
    return int(stat_fields(tid)[16])


class Spawner:
    """One thread that starts every child process, kept at the priority `capibara up` was started
    with while the rest of the process is made nicer (`lower_the_rest`): a model server restarted
    after that still gets the model servers' priority, which no unprivileged process could give
    back to it later."""

    def __init__(self):
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="capibara-spawner")
        # The thread exists from here on (a pool starts its thread with the first task).
        self.thread_id = self.executor.submit(threading.get_native_id).result()

    async def run(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    def lower_the_rest(self, nice: int) -> None:
        """Every thread of this process but the spawner's `nice` levels nicer (threads created
        later inherit it from their creator), and its session group too when this process leads
        its own session (never a terminal's: that would slow the user's shell)."""
        tasks = pathlib.Path("/proc/self/task")
        if nice <= 0 or not tasks.is_dir():  # no /proc: not Linux, nothing to lower this way
            return
        for task in tasks.iterdir():
            tid = int(task.name)
            if tid != self.thread_id:
                with contextlib.suppress(OSError):  # a thread that just ended
                    os.setpriority(os.PRIO_PROCESS, tid, min(19, thread_nice(tid) + nice))
        if os.getsid(0) == os.getpid():
            lower_session_group("self", nice)

    def close(self) -> None:
        """Wait for a start under way, then let the thread go."""
        self.executor.shutdown(wait=True)
