"""The gRPC clients satisfy the protocols the gateway is typed against (names, parameters, async)."""

from __future__ import annotations

import inspect

import pytest
from capibara_gateway import protocols

from capibara_grpc.consensus.client import ConsensusClient
from capibara_grpc.context.client import ContextClient
from capibara_grpc.speech.client import SpeechClient


def methods(protocol) -> list[str]:
    return [name for name, value in vars(protocol).items() if inspect.isfunction(value) and not name.startswith("_")]


def same_shape(implementation, declared) -> bool:
    got, want = inspect.signature(implementation), inspect.signature(declared)
    kind = inspect.isasyncgenfunction if inspect.isasyncgenfunction(implementation) else inspect.iscoroutinefunction
    return list(got.parameters) == list(want.parameters) and (kind(implementation) or kind(declared))


@pytest.mark.parametrize("protocol, client", [(protocols.Context, ContextClient), (protocols.Speech, SpeechClient)])
def test_clients_have_every_method_of_their_protocol(protocol, client):
    assert methods(protocol)
    for name in methods(protocol):
        assert same_shape(getattr(client, name), getattr(protocol, name)), name


def test_the_consensus_clients_decide_is_the_consensus_callable():
    assert same_shape(ConsensusClient.decide, protocols.Consensus.__call__)
