"""The processes `capibara up` runs: each in its own process group with its output appended to
its log in state_dir/logs, stopped (then killed) as a group, and reported with its cause of death
(process_exit.describe_exit), its log's path and last lines when it dies; while the model servers
load, how long each has been loading (LoadProgress)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import typing

from capibara_grpc.supervision.priority import start_nicer
from capibara_grpc.supervision.process_exit import describe_exit
from capibara_grpc.supervision.supervisor import RestartTracker


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


# States of a supervised child.
RUNNING, WAITING, GIVEN_UP, LEFT_DEAD = "running", "waiting to restart", "given up", "left dead"


class ChildProcess:
    """One process `capibara up` runs. `role` says what the mesh loses while it is down; `ports`
    are the sockets it listens on, free again before a restart."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: pathlib.Path,
        env: dict[str, str] | None = None,
        role: str = "",
        ports: list[tuple[str, int]] | None = None,
        nice: int = 0,
    ):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = {**os.environ, **env} if env else None
        self.role = role or name
        self.ports = ports or []
        # Levels nicer than the thread that starts it (capibara_grpc/supervision/priority.py): the mesh's own
        # processes run nicer than the model servers.
        self.nice = nice
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self.state = RUNNING
        self.last_exit: int | None = None
        self.tracker: RestartTracker | None = None
        self.restart_task: asyncio.Task | None = None

    def start(self, note: str = "") -> None:
        if self.nice and shutil.which(self.argv[0]) is None:
            # Run through `nice`, a missing binary would be nice's exit 127, restarted in a loop.
            raise FileNotFoundError(errno.ENOENT, "no such file", self.argv[0])
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            if note:
                log.write(f"\n--- capibara up, {time.strftime('%Y-%m-%d %H:%M:%S')}: {note} ---\n".encode())
                log.flush()
            self.process = start_nicer(
                self.argv, self.nice, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env
            )
        self.started_at = time.monotonic()
        self.state = RUNNING

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def reap_group(self) -> None:
        """Kill what the dead process left in its process group (its own children, if any)."""
        if self.process is not None and self.process.poll() is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def death_message(
    child: ChildProcess, returncode: int, uptime_s: float | None = None, action: str = "", tail_lines: int = 10
) -> str:
    """'<name> (pid N) killed by SIGILL (illegal instruction: ...) after 2.1 s; <action>; log: <path>',
    then the log's last lines, indented."""
    ran = f" after {format_duration(uptime_s)}" if uptime_s is not None else ""
    message = (
        f"{child.name} (pid {child.pid}) {describe_exit(returncode)}{ran}{'; ' + action if action else ''}; "
        f"log: {child.log_path}"
    )
    tail = indented_tail(child, tail_lines)
    return message + ("\n" + tail if tail else "")


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def indented_tail(child: ChildProcess, lines: int = 10) -> str:
    return "\n".join(f"    | {line}" for line in child.tail(lines).splitlines())


class LoadProgress:
    """How long each model server has been loading, while `capibara up` waits for its /health.

    On a terminal: one line, redrawn in place (\\r) every `tick_s`. Elsewhere (a log file, CI
    output): a line when the wait starts, one per server when it is ready, and the whole status
    every `every_s` while any is still loading, so a quick start prints a few lines, never one per
    tick. Other messages meanwhile call clear() first, so they do not land inside the line."""

    def __init__(
        self,
        names: list[str],
        stream: typing.TextIO | None = None,
        every_s: float = 5.0,
        tick_s: float = 0.5,
        clock: typing.Callable[[], float] = time.monotonic,
    ):
        self.names = list(names)
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s, self.tick_s, self.clock = every_s, tick_s, clock
        self.started = clock()
        self.took: dict[str, float | None] = {}  # name -> seconds until ready; None: given up on
        self.drawn = False  # the terminal's cursor is at the end of our line

    def status(self) -> str:
        elapsed = self.clock() - self.started
        parts = []
        for name in self.names:
            if name not in self.took:
                parts.append(f"{name} {elapsed:.0f} s")
            elif self.took[name] is None:
                parts.append(f"{name} not coming")
            else:
                parts.append(f"{name} ready in {self.took[name]:.1f} s")
        return "loading models: " + ", ".join(parts)

    @property
    def loading(self) -> list[str]:
        return [name for name in self.names if name not in self.took]

    def ready(self, name: str, up: bool = True) -> None:
        """`name` answers its /health (`up`), or was given up on."""
        self.took[name] = self.clock() - self.started if up else None
        if self.tty:
            self._draw()
        elif up:
            self._write(f"  {name} ready in {self.took[name]:.1f} s\n")

    async def run(self) -> None:
        """Show the progress until cancelled (close() ends it)."""
        if self.tty:
            while True:
                self._draw()
                await asyncio.sleep(self.tick_s)
        self._write(f"waiting for {len(self.names)} model server(s) to load: {', '.join(self.names)}\n")
        while True:
            await asyncio.sleep(self.every_s)
            if self.loading:
                self._write(self.status() + "\n")

    def clear(self) -> None:
        """Before another message: the terminal's line is wiped (redrawn at the next tick)."""
        if self.drawn:
            self._write("\r\033[K")
            self.drawn = False

    def close(self) -> None:
        """The wait is over: on a terminal, the last status stays on its own line."""
        if self.tty:
            self._draw()
            self._write("\n")
            self.drawn = False

    def _draw(self) -> None:
        width = shutil.get_terminal_size((100, 24)).columns - 1
        line = self.status()
        if len(line) > width:
            line = line[: max(width - 1, 0)] + "…"
        self._write("\r" + line + "\033[K")
        self.drawn = True

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stdout never stops the mesh
            self.stream.write(text)
            self.stream.flush()
