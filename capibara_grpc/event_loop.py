"""The event loop every mesh process runs on (services.event_loop).

uvloop (libuv's loop, written in Cython) is what uvicorn runs on, so LiteLLM and most Python
gateways too; grpc.aio and aiohttp run on it unchanged. Measured on the mesh's hot path (one
process, /v1 chat, 32 in flight; benchmarks/peers.py): about a fifth less CPU per chat than
Python's own loop.
"""

from __future__ import annotations

import asyncio
import typing

T = typing.TypeVar("T")


def run(main: typing.Coroutine[typing.Any, typing.Any, T], loop: str = "uvloop") -> T:
    """asyncio.run(main) on `loop`: "uvloop" or "asyncio"."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
