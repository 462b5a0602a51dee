"""A small SSE reader for the tests: (arrival time, event) pairs as they come off the wire."""

from __future__ import annotations

import json
import time

import aiohttp


async def read_events(mesh, path: str, body: dict, stop_after: int | None = None):
    """POST `body` and return (status, [(seconds since request, event)], content type)."""
    started = time.perf_counter()
    events = []
    async with aiohttp.ClientSession() as session:
        async with session.post(mesh.base_url + path, json=body, ssl=mesh.ssl_context()) as response:
            if response.status != 200:
                return response.status, await response.json(content_type=None), response.content_type
            async for line in response.content:
                if line.startswith(b"data:"):
                    events.append((time.perf_counter() - started, json.loads(line[5:])))
                    if stop_after is not None and len(events) >= stop_after:
                        break  # leaving the block closes the connection: a client going away
            return response.status, events, response.content_type
