"""Test fixtures: a real mesh (llama-servers, gRPC services, Envoy) started with `capibara up`."""

from __future__ import annotations

import pytest

from tests.support.mesh import launched_model, running_mesh


@pytest.fixture(scope="session")
def mesh(tmp_path_factory):
    """The main mesh: gpt-oss-20b and phi on llama.cpp's native API, mixtral over the OpenAI API."""
    models = {
        "gpt-oss-20b": launched_model(25080),
        "phi": launched_model(25081, max_tokens=20, temperature=0.5),
        "mixtral": launched_model(25082, protocol="openai"),
    }
    with running_mesh(tmp_path_factory.mktemp("mesh"), 25000, models) as running:
        yield running
