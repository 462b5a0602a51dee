"""How a process starts the speech service (its row in capibara_grpc/services.py names `start`)."""

from __future__ import annotations

import asyncio

from capibara_grpc.server import MeshServers
from capibara_grpc.speech.core import Speech, build_engines
from capibara_grpc.speech.servicer import SpeechServicer
from capibara_grpc.stubs import speech_pb2_grpc


async def start(servers: MeshServers) -> None:
    # A Coqui model takes seconds to load: off the event loop.
    engines = await asyncio.to_thread(build_engines, servers.config)
    servicer = SpeechServicer(Speech(servers.config, engines))
    await servers.serve("speech", lambda server: speech_pb2_grpc.add_SpeechServiceServicer_to_server(servicer, server))
