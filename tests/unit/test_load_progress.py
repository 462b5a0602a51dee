"""What `capibara up` shows while its model servers load (children.LoadProgress): a line redrawn
in place on a terminal, a few plain lines elsewhere."""

from __future__ import annotations

import asyncio
import io

from capibara_grpc.supervision.children import LoadProgress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_on_a_terminal_one_line_is_redrawn_in_place():
    screen, clock = Terminal(), Clock()
    progress = LoadProgress(["phi", "mixtral"], stream=screen, clock=clock)
    progress._draw()
    clock.now += 3.2
    progress.ready("phi")
    clock.now += 9
    progress._draw()
    progress.close()
    frames = screen.getvalue().split("\r")
    assert frames == [
        "",
        "loading models: phi 0 s, mixtral 0 s\033[K",
        "loading models: phi ready in 3.2 s, mixtral 3 s\033[K",
        "loading models: phi ready in 3.2 s, mixtral 12 s\033[K",
        "loading models: phi ready in 3.2 s, mixtral 12 s\033[K\n",
    ]


def test_another_message_first_wipes_the_line():
    screen = Terminal()
    progress = LoadProgress(["phi"], stream=screen)
    progress._draw()
    progress.clear()
    assert screen.getvalue().endswith("\r\033[K")
    progress.clear()  # nothing drawn since: nothing written
    assert screen.getvalue().count("\r\033[K") == 1


def test_elsewhere_a_line_every_few_seconds_and_one_per_ready_server():
    log = io.StringIO()

    async def main():
        progress = LoadProgress(["phi", "mixtral"], stream=log, every_s=0.05, tick_s=0.001)
        shown = asyncio.create_task(progress.run())
        await asyncio.sleep(0.13)  # two periodic lines, not one per tick
        progress.ready("phi")
        progress.ready("mixtral", up=False)  # given up on: the mesh says so itself
        await asyncio.sleep(0.12)  # nothing loading: no more lines
        shown.cancel()
        progress.close()

    asyncio.run(main())
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and "\033" not in log.getvalue()
    assert lines[0] == "waiting for 2 model server(s) to load: phi, mixtral"
    periodic = [line for line in lines if line.startswith("loading models: ")]
    assert 1 <= len(periodic) <= 2  # each at least every_s apart, however busy the machine
    assert periodic[0] == "loading models: phi 0 s, mixtral 0 s"
    assert lines[1 + len(periodic)].startswith("  phi ready in 0.") and lines[-1].endswith(" s")
    assert len(lines) == 2 + len(periodic)


def test_a_long_line_fits_the_terminal(monkeypatch):
    import os
    import shutil

    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback: os.terminal_size((30, 24)))
    screen = Terminal()
    LoadProgress(["gpt-oss-20b", "mixtral", "phi"], stream=screen)._draw()
    line = screen.getvalue().removeprefix("\r").removesuffix("\033[K")
    assert len(line) == 29 and line.endswith("…")
