"""A few sympy worker processes, each task under a hard time bound.

Why processes that are killed, and not threads, signals or a ProcessPoolExecutor: sympy can run
for minutes (factoring a large semiprime, integrating something nasty, simplifying a big
expression), and much of that time is inside C loops that hold the GIL (big-integer arithmetic).
A thread cannot be stopped at all; SIGALRM in the worker is only seen between bytecodes, so it
cannot interrupt a long C call; a ProcessPoolExecutor's future.result(timeout) returns but leaves
the worker busy with the runaway task. A plain child process that gets SIGKILL always stops. The
children are started with subprocess (a fresh interpreter), not fork(): the context service runs
grpc.aio, whose threads and event loop must not be forked. A killed worker is replaced at once,
and two workers serve concurrent requests, so one runaway task delays nobody else.

The bound is on the worker's CPU time (from /proc), with a longer wall-clock cap: on a busy host
a small task may wait for a core, and should not lose its answer for that; a runaway task burns
CPU and is stopped after CPU_LIMIT whatever the load.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import pathlib
import select
import subprocess
import sys
import threading
import time

log = logging.getLogger(__name__)

CPU_LIMIT = 2.0  # seconds of the worker's CPU per task
WALL_LIMIT = 4.0  # seconds per task, whatever the CPU
# Seconds a question waits for a worker that is still importing sympy (about 0.5 s of CPU; the
# workers start with the service, so normally none). A worker that is late is not killed, only
# skipped for that question (nothing added). With WALL_LIMIT, within the gateway's 10 s deadline.
STARTUP_WAIT = 4.0
_ROOT = str(pathlib.Path(__file__).resolve().parents[3])
_TICK = os.sysconf("SC_CLK_TCK")


class _Worker:
    def __init__(self):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")])))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "capibara_grpc.context.math.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self.ready = False

    def cpu_seconds(self) -> float:
        """User + system CPU time of the worker; 0 where /proc is not there (the wall cap still holds)."""
        try:
            with open(f"/proc/{self.process.pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / _TICK
        except (OSError, IndexError, ValueError):
            return 0.0

    def _line(self, cpu_limit: float, wall_limit: float) -> bytes | None:
        """The next line, or None once the worker used cpu_limit CPU seconds or wall_limit passed."""
        cpu_start, wall_end = self.cpu_seconds(), time.monotonic() + wall_limit
        while True:
            readable, _, _ = select.select([self.process.stdout], [], [], 0.05)
            if readable:
                return self.process.stdout.readline()
            if time.monotonic() > wall_end or self.cpu_seconds() - cpu_start > cpu_limit:
                return None

    def start(self, wait: float) -> bool:
        if not self.ready:
            line = self._line(wait, wait)
            if line is not None and line != b"ready\n":
                raise OSError("the worker did not start")  # it exited: killed and replaced
            self.ready = line is not None
        return self.ready

    def run(self, task: dict, cpu_limit: float, wall_limit: float) -> dict | None:
        """The answer, or None when the worker overran its limits or died."""
        self.process.stdin.write(json.dumps(task).encode() + b"\n")
        self.process.stdin.flush()
        line = self._line(cpu_limit, wall_limit)
        return json.loads(line) if line else None

    def kill(self):
        self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            stream.close()


class SympyPool:
    def __init__(
        self,
        size: int = 2,
        cpu_limit: float = CPU_LIMIT,
        wall_limit: float = WALL_LIMIT,
        startup_wait: float = STARTUP_WAIT,
    ):
        self.size, self.cpu_limit, self.wall_limit, self.startup_wait = size, cpu_limit, wall_limit, startup_wait
        self._idle: collections.deque[_Worker] = collections.deque()  # ready ones first
        self._free = threading.Condition()
        self._all: set[_Worker] = set()
        atexit.register(self.close)

    def warm_up(self) -> None:
        """Start the workers now, so the first question does not wait for sympy's import."""
        with self._free:
            while len(self._all) < self.size:
                self._spawn()

    def wait_ready(self, timeout: float) -> bool:
        """Block until a worker has started (for callers that are not a service: scripts, tests)."""
        self.warm_up()
        worker = self._acquire()
        if worker is None:
            return False
        try:
            return worker.start(timeout)
        finally:
            self._release(worker)

    def _spawn(self) -> None:
        worker = _Worker()
        self._all.add(worker)
        self._idle.append(worker)
        self._free.notify()

    def _acquire(self) -> _Worker | None:
        with self._free:
            while len(self._all) < self.size:
                self._spawn()
            if not self._free.wait_for(lambda: self._idle, timeout=self.startup_wait):
                return None
            return self._idle.popleft()

    def _release(self, worker: _Worker) -> None:
        with self._free:
            (self._idle.appendleft if worker.ready else self._idle.append)(worker)
            self._free.notify()

    def run(self, task: dict) -> dict | None:
        """{"text": ...} or {"refused": ...}; None when no answer came within the limits."""
        worker = self._acquire()
        if worker is None:
            log.warning("math: no sympy worker free, nothing added")
            return None
        try:
            if not worker.start(self.startup_wait):
                self._release(worker)
                log.warning("math: the sympy worker is still starting, nothing added")
                return None
            answer = worker.run(task, self.cpu_limit, self.wall_limit)
        except (OSError, ValueError):  # a worker that died: broken pipe, garbled line
            answer = None
        if answer is not None:
            self._release(worker)
            return answer
        log.warning(
            "math: gave up on %s after %.1f s of CPU or %.1f s; its worker was killed and replaced",
            task["op"],
            self.cpu_limit,
            self.wall_limit,
        )
        worker.kill()
        with self._free:
            self._all.discard(worker)
            self._spawn()
        return None

    def close(self) -> None:
        with self._free:
            for worker in self._all:
                worker.kill()
            self._all.clear()
            self._idle.clear()
