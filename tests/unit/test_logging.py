"""Logs: readable text lines for a person at a terminal, JSON lines everywhere else."""

from __future__ import annotations

import io
import json
import logging

import pytest

from capibara_grpc import tracing


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch):
    monkeypatch.delenv(tracing.LOG_FORMAT_ENV, raising=False)
    yield
    logging.basicConfig(handlers=[logging.NullHandler()], force=True)


def _log_a_call(request_id: str = "req-1234") -> None:
    token = tracing.current_request_id.set(request_id)
    try:
        logging.getLogger("capibara.calls").info(
            "%s %s",
            "/capibara.router.v1.RouterService/Route",
            "OK",
            extra={"fields": {"method": "/capibara.router.v1.RouterService/Route", "code": "OK", "ms": 12.5}},
        )
    finally:
        tracing.current_request_id.reset(token)


def test_a_terminal_gets_one_readable_line_per_call():
    stream = Terminal()
    tracing.configure_logging(stream=stream)
    _log_a_call()
    (line,) = stream.getvalue().splitlines()
    assert line.split()[1:] == [
        "INFO",
        "capibara.calls:",
        "/capibara.router.v1.RouterService/Route",
        "OK",
        "ms=12.5",
        "request_id=req-1234",
    ]
    assert not line.startswith("{")


def test_a_pipe_or_file_gets_json_lines():
    stream = io.StringIO()
    tracing.configure_logging(stream=stream)
    _log_a_call()
    entry = json.loads(stream.getvalue())
    assert entry["level"] == "info" and entry["logger"] == "capibara.calls" and entry["request_id"] == "req-1234"
    assert entry["message"] == "/capibara.router.v1.RouterService/Route OK" and entry["ms"] == 12.5


def test_the_log_file_is_json_even_when_the_terminal_shows_text(tmp_path):
    stream, log_file = Terminal(), tmp_path / "logs" / "capibara.log"
    tracing.configure_logging(stream=stream, log_file=log_file)
    _log_a_call()
    assert not stream.getvalue().startswith("{")
    assert json.loads(log_file.read_text())["request_id"] == "req-1234"


@pytest.mark.parametrize(
    "chosen, on_terminal, as_json", [("json", True, True), ("text", False, False), ("", True, False)]
)
def test_the_environment_can_choose(monkeypatch, chosen, on_terminal, as_json):
    monkeypatch.setenv(tracing.LOG_FORMAT_ENV, chosen)
    assert tracing.wants_json(Terminal() if on_terminal else io.StringIO()) is as_json


def test_an_exception_follows_its_text_line():
    stream = Terminal()
    tracing.configure_logging(stream=stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("x").exception("failed")
    first, *rest = stream.getvalue().splitlines()
    assert first.endswith("ERROR   x: failed") and "RuntimeError: boom" in rest[-1]
