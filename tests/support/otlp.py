"""The OTLP/gRPC receiver (capibara_grpc/telemetry/receiver.py) for synchronous tests: on its own
event loop in a background thread, as the fake model servers are, while the mesh and Envoy (other
processes) export to it over a real socket."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from capibara_grpc.telemetry.receiver import OtlpReceiver, ReceivedSpan


class ThreadedReceiver:
    def __init__(self, receiver: OtlpReceiver, loop: asyncio.AbstractEventLoop):
        self.receiver, self._loop = receiver, loop

    @property
    def endpoint(self) -> str:
        return self.receiver.endpoint

    @property
    def spans(self) -> list[ReceivedSpan]:
        return list(self.receiver.spans)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return self.receiver.trace(trace_id)

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], Any], timeout_s: float = 30) -> Any:
        future = asyncio.run_coroutine_threadsafe(self.receiver.wait_for(predicate, timeout_s), self._loop)
        return future.result(timeout_s + 5)


@contextmanager
def otlp_receiver(port: int = 0) -> Iterator[ThreadedReceiver]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="otlp-receiver", daemon=True)
    thread.start()
    receiver = asyncio.run_coroutine_threadsafe(OtlpReceiver.start("127.0.0.1", port), loop).result(10)
    try:
        yield ThreadedReceiver(receiver, loop)
    finally:
        asyncio.run_coroutine_threadsafe(receiver.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
