"""How a process starts the consensus service (its row in capibara_grpc/services.py names `start`)."""

from __future__ import annotations

import asyncio

from capibara_grpc.consensus.core import ConsensusEngine
from capibara_grpc.consensus.servicer import ConsensusServicer
from capibara_grpc.inference.client import InferenceClient
from capibara_grpc.sentence_encoder import shared_encoder
from capibara_grpc.server import MeshServers
from capibara_grpc.stubs import consensus_pb2_grpc


async def start(servers: MeshServers) -> None:
    config = servers.config
    # Groups answers by meaning; one encoder per model in a process, shared with the router here.
    encoder = await asyncio.to_thread(shared_encoder, config.consensus.encoder, config.router.cache_size)
    inference = servers.channel("inference")
    servicer = ConsensusServicer(ConsensusEngine(config, InferenceClient(inference).generate, encoder.encode))
    await servers.serve(
        "consensus", lambda server: consensus_pb2_grpc.add_ConsensusServiceServicer_to_server(servicer, server)
    )
