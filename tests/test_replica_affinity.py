"""Cache-aware replicas on real llama-servers (backend.balance: affinity, the default): two
servers of the shipped SmolLM2 behind one model. A conversation's turns, resent whole as /v1
clients do, land on one server, which reuses its cached prompt (seen in each llama-server's own
/metrics); when that server is killed the conversation goes on on the other one; the status page
shows the choices."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request

import pytest

from tests.support.mesh import launched_model, processes_using, running_mesh

BASE = 7000  # edge 7001, services 7050-7055, metrics 7070-7075, admin 7901
SERVERS = {"first": 7090, "second": 7091}
MODEL = "gpt-oss-20b"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    model = launched_model(SERVERS["first"], parallel=1, max_tokens=8, temperature=0)
    model["launch"]["extra_args"] = ["--metrics"]
    model["backend"]["replicas"] = [f"http://127.0.0.1:{SERVERS['second']}"]
    with running_mesh(tmp_path_factory.mktemp("affinity"), BASE, {MODEL: model}, router=False) as running:
        yield running


def served(port: int) -> tuple[float, float]:
    """(tokens predicted, prompt tokens processed) so far by the llama-server on `port`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    figures = {}
    for line in text.splitlines():
        if line.startswith("llamacpp:") and " " in line:
            name, value = line.split(" ", 1)
            figures[name.removeprefix("llamacpp:")] = float(value)
    return figures["tokens_predicted_total"], figures["prompt_tokens_total"]


def turn(mesh, messages: list[dict]) -> str:
    status, body, _ = mesh.request(
        "POST", "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0}
    )
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


def which_served(mesh, messages: list[dict]) -> tuple[str, float]:
    """The server that answered one more turn of `messages`, and the prompt tokens it processed."""
    before = {name: served(port) for name, port in SERVERS.items()}
    messages.append({"role": "assistant", "content": turn(mesh, messages)})
    after = {name: served(port) for name, port in SERVERS.items()}
    (name,) = [n for n in SERVERS if after[n][0] > before[n][0]]
    return name, after[name][1] - before[name][1]


QUESTIONS = [
    "Describe the capybara: where it lives, what it eats, how large it grows and how it behaves in groups.",
    "And how does it swim?",
    "What eats it?",
    "How long does it live?",
]


def test_a_conversations_turns_stay_on_one_server_which_reuses_its_cached_prompt(mesh):
    messages = [{"role": "system", "content": "You are a patient biology teacher. Answer in one sentence."}]
    landed, processed = [], []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        name, prompt = which_served(mesh, messages)
        landed.append(name)
        processed.append(prompt)
    assert len(set(landed)) == 1, landed
    # Later turns process only what is new (the first turn processed the system prompt and question).
    assert all(p < processed[0] for p in processed[1:]), processed
    # Another conversation goes to the other server (the first one is idle again: ties rotate).
    other = [{"role": "user", "content": "Name three rivers of South America."}]
    assert which_served(mesh, other)[0] != landed[0]


def test_the_status_page_shows_each_server_and_the_choices(mesh):
    deadline = time.monotonic() + 10
    while True:  # the sampler reads the inference service's /metrics every 2 s
        status, body, _ = mesh.request("GET", "/api/status")
        assert status == 200, body
        (model,) = [m for m in body["models"] if m["model_id"] == MODEL]
        replicas = model.get("replicas", [])
        if sum(r.get("affinity", 0) for r in replicas) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {r["url"] for r in replicas} == {f"http://127.0.0.1:{p}" for p in SERVERS.values()}, model
    assert sum(r.get("affinity", 0) for r in replicas) >= 3 and sum(r.get("pinned", 0) for r in replicas) >= 2
    assert all(r["up"] for r in replicas)
    assert model["last_replica"]["outcome"] in {"affinity", "new", "fallback"}


async def test_when_its_server_is_killed_the_conversation_goes_on_on_the_other(mesh):
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Tell me about the Amazon river."},
    ]
    home, _ = which_served(mesh, messages)
    (line,) = [p for p in processes_using(f"--port {SERVERS[home]} ") if "llama-server" in p]
    os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
    await asyncio.sleep(0.2)
    messages.append({"role": "user", "content": "How long is it?"})
    started = time.monotonic()
    assert turn(mesh, messages)
    assert time.monotonic() - started < 10
    other = next(n for n in SERVERS if n != home)
    before = served(SERVERS[other])[0]
    messages.append({"role": "user", "content": "And how wide?"})
    assert turn(mesh, messages)
    assert served(SERVERS[other])[0] > before
