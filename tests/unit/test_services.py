"""The service table (capibara_grpc/services.py) is the one list of services: everything that
lists them is derived from it, and one process starts its services from it."""

from __future__ import annotations

import pathlib
import re
import socket
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from capibara_grpc import services
from capibara_grpc.config import SERVICE_NAMES, MeshConfig, parse_config
from capibara_grpc.services import SERVICES

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_names_ports_and_ranks_are_distinct():
    for column in ("name", "full_name", "proto", "port", "start_rank"):
        values = [getattr(s, column) for s in SERVICES]
        assert len(set(values)) == len(values), column
    assert all(s.rate_tier in ("chat", "other") for s in SERVICES)
    assert all(re.fullmatch(r"[\w.]+:\w+", s.start) for s in SERVICES)


def test_each_full_name_is_a_service_of_its_proto_module():
    from capibara_grpc.stubs import PROTO_MODULES

    for row, module in zip(SERVICES, PROTO_MODULES, strict=True):
        assert module.__name__ == row.proto
        assert row.full_name in {s.full_name for s in module.DESCRIPTOR.services_by_name.values()}


def test_what_lists_services_is_derived_from_the_table():
    from capibara_grpc import server, stubs
    from capibara_grpc.edge import envoy_config

    assert SERVICE_NAMES == ("gateway", "router", "context", "inference", "consensus", "speech")
    assert stubs.SERVICE_FULL_NAMES == {s.name: s.full_name for s in SERVICES}
    assert server.START_ORDER == ["inference", "router", "context", "consensus", "speech", "gateway"]
    assert server.REQUIRED_BY_GATEWAY == ("context", "inference")
    assert envoy_config.GENERATING_SERVICES == ("gateway", "consensus")
    config = MeshConfig()
    assert {name: e.port for name, e in config.services.endpoints.items()} == {s.name: s.port for s in SERVICES}
    assert config.services.gateway.port == 50050  # attribute access, as before the table


def test_switches_leave_services_out():
    config = MeshConfig()
    assert config.deployed_services == list(SERVICE_NAMES)
    config.router.enabled = False
    config.speech.enabled = False
    assert config.deployed_services == ["gateway", "context", "inference", "consensus"]


def test_no_other_module_spells_out_the_list():
    names = "|".join(SERVICE_NAMES)
    listing = re.compile(rf"""["']({names})["'],\s*["']({names})["'],\s*["']({names})["']""")
    sources = [*(REPO / "capibara_grpc").rglob("*.py"), *(REPO / "gateway").rglob("*.py")]
    offenders = [
        str(path.relative_to(REPO))
        for path in sources
        if "generated" not in path.parts and path.name != "services.py" and listing.search(path.read_text())
    ]
    assert offenders == []


def test_the_library_never_imports_the_gateway():
    """The gateway depends on the library, never the other way: its start function is a string."""
    code = (
        "import sys, capibara_grpc.cli, capibara_grpc.supervision.launcher, capibara_grpc.server, capibara_grpc.config;"
        "print([m for m in sys.modules if m.startswith(('capibara_gateway', 'capibara_grpc.gateway'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stderr


def test_every_start_function_resolves():
    for name in SERVICE_NAMES:
        assert callable(services.start_function(name))
    with pytest.raises(KeyError, match="unknown service 'nope' \\(known: gateway, router"):
        services.service("nope")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_a_process_starts_a_service_from_its_row(tmp_path):
    """`capibara serve context` in miniature: the row's start function, health, reflection."""
    from capibara_grpc.server import MeshServers

    port, metrics_port = _free_port(), _free_port()
    config = parse_config(
        f"""
state_dir: {tmp_path}
services: {{context: {{port: {port}, metrics_port: {metrics_port}}}}}
router: {{enabled: false}}
speech: {{enabled: false}}
gateway: {{default_model: m}}
models: {{m: {{backend: {{url: "http://127.0.0.1:9"}}}}}}
""",
        source="test.yaml",
        check_files=False,
    )
    servers = await MeshServers(config, ["context"]).start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", "capibara.context.v1.ContextService"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            # Reflection lists the service (grpc's asyncio servicer: the error-mapped server is a
            # grpc.aio.Server to grpc_reflection).
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            replies = [reply async for reply in reflection.ServerReflectionInfo(iter([request]), timeout=5)]
            listed = {s.name for s in replies[0].list_services_response.service}
            assert {"capibara.context.v1.ContextService", "grpc.health.v1.Health"} <= listed, listed
        assert isinstance(servers.servers[0], grpc.aio.Server)
    finally:
        await servers.stop()


def test_an_unknown_service_is_refused_naming_the_known_ones():
    from capibara_grpc.server import MeshServers

    with pytest.raises(ValueError, match="unknown service\\(s\\) nope \\(known: gateway, router, context"):
        MeshServers(MeshConfig(), ["nope"])
