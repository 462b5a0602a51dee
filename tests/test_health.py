"""GET /health in a partial outage: SERVING, DEGRADED (200, listing what is down) or 503.

The verdict is tested as plain data first; then through the real edge on a `--split` mesh (one
process per service) whose context or speech process is frozen (SIGSTOP: a hung process that no
supervisor restarts, so the outage lasts exactly as long as the test wants) or whose only live
llama-server is frozen."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest
from capibara_gateway.health import DEGRADED, NOT_SERVING, SERVING, HealthReport, ServiceHealth, required_services

from capibara_grpc.health_names import model_health_name
from capibara_grpc.stubs import SERVICE_FULL_NAMES
from tests.support.mesh import launched_model, running_mesh

DEPLOYED = ["gateway", "router", "context", "inference", "consensus", "speech"]
MODELS = ["gpt-oss-20b", "mixtral", "phi"]


def report(down: dict[str, str] = {}) -> HealthReport:  # noqa: B006 - read only
    """A report of the full default mesh where the entries in `down` (short service name or model
    id → status) are not SERVING."""
    entries = [ServiceHealth(SERVICE_FULL_NAMES[s], down.get(s, SERVING)) for s in DEPLOYED]
    entries += [
        ServiceHealth(
            model_health_name(m), down.get(m, SERVING), "unreachable (ClientConnectorError)" if m in down else ""
        )
        for m in MODELS
    ]
    return HealthReport(entries, required_services(DEPLOYED), [model_health_name(m) for m in MODELS])


def test_all_up_is_serving():
    verdict = report().verdict
    assert verdict.status == SERVING and verdict.can_chat and verdict.down == []


def test_one_model_down_is_degraded_and_lists_it():
    verdict = report({"phi": "NOT_SERVING"}).verdict
    assert verdict.status == DEGRADED and verdict.can_chat
    assert verdict.down == [f"{model_health_name('phi')} NOT_SERVING (unreachable (ClientConnectorError))"]
    assert "mixtral" not in verdict.summary and "phi NOT_SERVING" in verdict.summary


def test_every_model_down_cannot_chat_and_names_them():
    # The inference service itself is NOT_SERVING then too; a report from just before its next
    # probe may still say SERVING: either way no chat can be served.
    for inference in ("NOT_SERVING", SERVING):
        verdict = report({m: "NOT_SERVING" for m in MODELS} | {"inference": inference}).verdict
        assert verdict.status == NOT_SERVING and not verdict.can_chat
        for model in MODELS:
            assert f"InferenceService/{model} NOT_SERVING" in verdict.summary
    assert "every model is down" in verdict.summary


@pytest.mark.parametrize("service", ["inference", "context", "gateway"])
@pytest.mark.parametrize("status", ["NOT_SERVING", "UNREACHABLE", "SERVICE_UNKNOWN"])
def test_a_required_service_down_cannot_chat(service, status):
    verdict = report({service: status}).verdict
    assert verdict.status == NOT_SERVING and not verdict.can_chat
    assert verdict.down == [f"{SERVICE_FULL_NAMES[service]} {status}"]
    assert f"{SERVICE_FULL_NAMES[service]} {status}" in verdict.summary


@pytest.mark.parametrize("service", ["router", "consensus", "speech"])
def test_an_optional_service_down_is_degraded(service):
    verdict = report({service: "UNREACHABLE", "mixtral": "NOT_SERVING"}).verdict
    assert verdict.status == DEGRADED and verdict.can_chat
    assert verdict.down == [
        f"{SERVICE_FULL_NAMES[service]} UNREACHABLE",
        f"{model_health_name('mixtral')} NOT_SERVING (unreachable (ClientConnectorError))",
    ]


def test_the_required_services_are_the_gateways_own_definition():
    from capibara_grpc.server import REQUIRED_BY_GATEWAY

    assert set(required_services(DEPLOYED)) == {SERVICE_FULL_NAMES[s] for s in ("gateway", *REQUIRED_BY_GATEWAY)}
    # Services this mesh does not deploy are not required of it.
    assert SERVICE_FULL_NAMES["context"] not in required_services(["gateway", "inference"])


# --- Through the edge -------------------------------------------------------------------------

BASE = 27500  # edge 27501, services 27550-27555, metrics 27570-27575, admin 28401
LIVE_PORT = BASE + 80
GONE_URL = f"http://127.0.0.1:{BASE + 99}"  # nothing listens there
CONTEXT = SERVICE_FULL_NAMES["context"]
SPEECH = SERVICE_FULL_NAMES["speech"]


@pytest.fixture(scope="module")
def split_mesh(tmp_path_factory):
    models = {
        # The default model, down: chats that name no model fail over to `alive`.
        "gone": {"backend": {"url": GONE_URL, "protocol": "llama_cpp"}, "fallbacks": ["alive"]},
        "alive": launched_model(LIVE_PORT, max_tokens=3),
    }
    with running_mesh(tmp_path_factory.mktemp("health"), BASE, models, router=False, split=True) as mesh:
        yield mesh


@contextlib.contextmanager
def frozen(pid: int):
    """The process hangs (accepts connections, answers nothing) until the block ends."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def health(mesh):
    return mesh.request("GET", "/health", timeout=30)


def eventually(check, timeout_s: float = 20.0):
    """The first truthy result of check(), or its last result after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def degraded_by_the_down_model_only(mesh):
    status, body, _ = health(mesh)
    return status == 200 and body["status"] == DEGRADED and len(body["down"]) == 1


def test_a_down_model_is_degraded_and_chats_still_answer(split_mesh):
    assert eventually(lambda: degraded_by_the_down_model_only(split_mesh)), health(split_mesh)
    status, body, _ = health(split_mesh)
    (down,) = body["down"]
    assert down.startswith("capibara.inference.v1.InferenceService/gone NOT_SERVING (unreachable"), down
    entries = {s["service"]: s for s in body["services"]}
    assert entries["capibara.inference.v1.InferenceService/gone"]["status"] == "NOT_SERVING"
    assert entries["capibara.inference.v1.InferenceService/alive"]["status"] == "SERVING"
    assert entries[CONTEXT]["status"] == "SERVING"
    assert "capibara.router.v1.RouterService" not in entries  # not deployed: not down either
    status, answer, _ = split_mesh.request("POST", "/api/chat", {"message": "hola"})
    assert status == 200 and answer["model_id"] == "alive", answer


def test_a_hung_optional_service_is_degraded_and_listed(split_mesh):
    with frozen(split_mesh.service_pid("speech")):
        status, body, _ = health(split_mesh)
        assert status == 200, body
        assert body["status"] == DEGRADED
        assert f"{SPEECH} UNREACHABLE" in "\n".join(body["down"]), body["down"]
        assert any("InferenceService/gone" in d for d in body["down"])
        assert {s["service"]: s["status"] for s in body["services"]}[SPEECH] == "UNREACHABLE"
        # A chat is still served.
        status, answer, _ = split_mesh.request("POST", "/api/chat", {"message": "hola", "model": "alive"})
        assert status == 200, answer
    assert eventually(lambda: degraded_by_the_down_model_only(split_mesh)), health(split_mesh)


def test_a_hung_required_service_is_503_naming_it(split_mesh):
    with frozen(split_mesh.service_pid("context")):
        status, error, _ = health(split_mesh)
        assert status == 503, error
        assert f"{CONTEXT} UNREACHABLE" in error["message"], error
        assert "a service that chats need is down" in error["message"]
        assert "SpeechService" not in error["message"] and "InferenceService/alive" not in error["message"]
    assert eventually(lambda: degraded_by_the_down_model_only(split_mesh)), health(split_mesh)


def test_every_model_down_is_503_naming_them(split_mesh):
    def unavailable():
        status, error, _ = health(split_mesh)
        return status == 503 and error

    with frozen(*split_mesh.llama_server_pids("alive")):
        # The inference service notices within a probe or two (every 2 s, 2 s timeout).
        error = eventually(unavailable, 30)
        assert error, health(split_mesh)
        assert "InferenceService/gone NOT_SERVING" in error["message"], error
        assert "InferenceService/alive NOT_SERVING" in error["message"], error
        assert "every model is down" in error["message"]
    assert eventually(lambda: degraded_by_the_down_model_only(split_mesh), 30), health(split_mesh)
