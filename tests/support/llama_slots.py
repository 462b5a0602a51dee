"""Keeping a llama-server slot busy, and waiting until a backend's slots are idle again."""

from __future__ import annotations

import asyncio
import time

import aiohttp

# Greedy decoding of this prompt runs to max_tokens on the shipped SmolLM2 (no early end-of-sequence),
# so the generation is surely still running when the client leaves.
LONG = {
    "message": "Count from 1 to 1000, separated by commas.",
    "max_tokens": 1500,
    "temperature": 0,
    "repeat_penalty": 1.0,
}


async def busy_slots(backend_url: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(backend_url + "/slots") as response:
            return sum(1 for slot in await response.json() if slot["is_processing"])


async def wait_until_idle(backend_url: str, timeout_s: float = 10.0) -> float:
    """Seconds until every slot of the backend is idle; fails the test past timeout_s."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if await busy_slots(backend_url) == 0:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"{backend_url} still generating {timeout_s} s after the client left")
