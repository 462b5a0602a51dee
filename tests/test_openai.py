"""The OpenAI-compatible API (/v1/...) through the edge, driven by the official openai SDK (sync
and async) over TLS with an API key, on a mesh of its own: phi (llama.cpp's native API) and mixtral
(over the OpenAI API) launched, gpt-oss-20b a fake backend that looks healthy and fails every generation (what the
router picks for programming: the gateway fails over to phi).

Over 400 lines: every test here shares that one module-scoped mesh; split in two files, the suite
would start a second mesh for nothing."""

from __future__ import annotations

import asyncio
import http.client
import http.server
import json
import os
import signal
import threading
import time

import aiohttp
import httpx2
import openai
import pytest

from tests.support.audio import read_wav, rms
from tests.support.llama_slots import busy_slots, wait_until_idle
from tests.support.mesh import launched_model, mesh_config, start_mesh, stop_mesh

KEY = "openai-test-key-0123456789"
CHAT_PER_MINUTE = 120
HELLO = [{"role": "user", "content": "Say hello."}]


class BrokenBackend(http.server.BaseHTTPRequestHandler):
    """A llama-server that looks healthy and fails every generation (HTTP 500): the router picks
    it, and the gateway fails over before the first token."""

    def do_GET(self):  # noqa: N802 - http.server's name
        answer = {"/health": {"status": "ok"}, "/props": {"default_generation_settings": {"n_ctx": 2048}}}
        self._send(200, answer.get(self.path.split("?")[0], {}))

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self._send(500, {"error": {"code": 500, "message": "the model crashed", "type": "server_error"}})

    def _send(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    directory = tmp_path_factory.mktemp("openai")
    keys = directory / "api-keys.txt"
    keys.write_text(f"{KEY}\n")
    broken = http.server.ThreadingHTTPServer(("127.0.0.1", 29099), BrokenBackend)
    threading.Thread(target=broken.serve_forever, daemon=True).start()
    models = {
        "phi": launched_model(29080),
        # Over llama-server's own OpenAI API: response_format reaches that backend kind too.
        # One generation at a time and none waiting: a second concurrent request is a 429.
        "mixtral": {**launched_model(29081, protocol="openai"), "max_concurrent": 1, "max_queued": 0},
        # Healthy to the router, failing to generate: named, it is a 503; routed to (programming),
        # the gateway fails over to phi.
        "gpt-oss-20b": {"backend": {"url": "http://127.0.0.1:29099", "protocol": "llama_cpp"}, "fallbacks": ["phi"]},
    }
    config = mesh_config(directory / "state", 29000, models)
    config["edge"].update(api_keys_file=str(keys), rate_limit={"chat": CHAT_PER_MINUTE, "other": 0})
    running = start_mesh(directory, config)
    try:
        yield running
    finally:
        stop_mesh(running)
        broken.shutdown()


def client(mesh, key: str = KEY, **transport) -> openai.OpenAI:
    http_client = openai.DefaultHttpxClient(
        verify=mesh.ssl_context(),
        **({"transport": httpx2.HTTPTransport(verify=mesh.ssl_context(), **transport)} if transport else {}),
    )
    return openai.OpenAI(base_url=mesh.base_url + "/v1", api_key=key, http_client=http_client, max_retries=0)


def async_client(mesh) -> openai.AsyncOpenAI:
    http_client = openai.DefaultAsyncHttpxClient(verify=mesh.ssl_context())
    return openai.AsyncOpenAI(base_url=mesh.base_url + "/v1", api_key=KEY, http_client=http_client, max_retries=0)


@pytest.mark.parametrize("model", ["auto", "mixtral", "consensus"])
def test_chat_completion(mesh, model):
    raw = client(mesh).chat.completions.with_raw_response.create(
        model=model, messages=HELLO, max_tokens=8, temperature=0
    )
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.model in ("phi", "mixtral")
    if model == "mixtral":
        assert completion.model == "mixtral"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    extension = completion.model_extra["capibara"]
    assert extension["model_id"] == completion.model
    assert extension["source"] == {"auto": "router", "mixtral": "request", "consensus": "consensus"}[model]
    assert raw.headers["x-capibara-model"] == completion.model
    assert raw.headers["x-request-id"]


def test_the_messages_are_the_conversation(mesh):
    completion = client(mesh).chat.completions.create(
        model="phi",
        messages=[
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": [{"type": "text", "text": "My name is Ana."}]},
            {"role": "assistant", "content": "Hello Ana."},
            {"role": "user", "content": "What is my name?"},
        ],
        max_completion_tokens=8,
        temperature=0,
        stop=["\n\n"],
        seed=7,
        user="someone",
    )
    assert completion.model == "phi" and completion.choices[0].message.content


async def test_async_stream_with_usage(mesh):
    async with async_client(mesh) as api:
        stream = await api.chat.completions.create(
            model="auto",
            messages=HELLO,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_sync_stream_named_model_and_consensus(mesh):
    api = client(mesh)
    for model in ("phi", "consensus"):
        chunks = list(api.chat.completions.create(model=model, messages=HELLO, max_tokens=6, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks)
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_raw_stream_bytes(mesh):
    connection = http.client.HTTPSConnection("localhost", mesh.config["edge"]["port"], context=mesh.ssl_context())
    body = {"model": "phi", "messages": HELLO, "max_tokens": 5, "stream": True}
    connection.request(
        "POST",
        "/v1/chat/completions",
        json.dumps(body),
        {"authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("content-type").startswith("text/event-stream")
    raw = response.read().decode()
    assert raw.endswith("\n\n")
    frames = raw[:-2].split("\n\n")
    assert all(f.startswith("data: ") and "\n" not in f for f in frames), raw
    assert frames[-1] == "data: [DONE]"
    assert json.loads(frames[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_models(mesh):
    api = client(mesh)
    ids = [m.id for m in api.models.list()]
    assert ids[:2] == ["auto", "consensus"] and {"phi", "mixtral", "gpt-oss-20b"} <= set(ids)
    assert api.models.retrieve("phi").id == "phi"
    with pytest.raises(openai.NotFoundError) as missing:
        api.models.retrieve("gpt5")
    assert missing.value.body["code"] == "model_not_found"


def test_bad_key_is_an_authentication_error(mesh):
    with pytest.raises(openai.AuthenticationError) as refused:
        client(mesh, key="wrong-key-0123456789").models.list()
    assert refused.value.body["type"] == "authentication_error"
    assert refused.value.body["message"] == "invalid API key"


def test_unknown_model_is_not_found(mesh):
    with pytest.raises(openai.NotFoundError) as missing:
        client(mesh).chat.completions.create(model="gpt5", messages=HELLO)
    assert missing.value.body["param"] == "model" and "gpt5" in missing.value.body["message"]


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        # Tools are taken (tests/test_tools.py); the old function-calling API is not.
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"temperature": 7}, "temperature"),
    ],
)
def test_unsupported_input_is_a_bad_request_naming_the_field(mesh, extra, param):
    with pytest.raises(openai.BadRequestError) as bad:
        client(mesh).chat.completions.create(model="phi", messages=HELLO, **extra)
    error = bad.value.body
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert bad.value.status_code == 400


def test_a_named_model_that_is_down_is_503(mesh):
    with pytest.raises(openai.InternalServerError) as down:
        client(mesh).chat.completions.create(model="gpt-oss-20b", messages=HELLO, max_tokens=4)
    assert down.value.status_code == 503 and "gpt-oss-20b" in down.value.body["message"]
    assert down.value.body["type"] == "server_error"
    # A stream that fails before its first token is the same HTTP error, not an empty stream.
    with pytest.raises(openai.InternalServerError) as down:
        client(mesh).chat.completions.create(model="gpt-oss-20b", messages=HELLO, max_tokens=4, stream=True)
    assert down.value.status_code == 503 and down.value.body["code"] == "service_unavailable"


def test_auto_fails_over_when_the_routed_model_is_down(mesh):
    raw = client(mesh).chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": "escribe una funcion en python que ordene una lista"}],
        max_tokens=6,
    )
    completion = raw.parse()
    extension = completion.model_extra["capibara"]
    assert extension["route_name"] == "programming" and extension["source"] == "router", extension
    assert completion.model == "phi" and extension["failed_models"] == ["gpt-oss-20b"], extension
    assert extension["fallback"] and completion.choices[0].message.content
    assert raw.headers["x-capibara-model"] == "phi" and raw.headers["x-capibara-failed-models"] == "gpt-oss-20b"


async def long_stream(api):
    """A streamed answer to mixtral that runs for a long while (mixtral serves one at a time)."""
    return await api.chat.completions.create(
        model="mixtral",
        messages=[{"role": "user", "content": "Count from 1 to 1000, separated by commas."}],
        max_tokens=1500,
        temperature=0,
        stream=True,
    )


async def test_disconnect_frees_the_slot(mesh):
    url = mesh.backend_url("mixtral")
    await wait_until_idle(url)
    async with async_client(mesh) as api:
        stream = await long_stream(api)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 4:
                break
        assert await busy_slots(url) == 1
        await stream.close()
    await wait_until_idle(url)


def test_rate_limit_is_429_with_retry_after(mesh):
    # From another loopback address: its own bucket, so the other tests keep theirs.
    api = client(mesh, local_address="127.0.0.2")
    # The bucket holds a minute's calls and gains one every 60/CHAT_PER_MINUTE s, so a slow
    # machine earns refills while it calls: count them, and allow exactly those.
    started, calls = time.monotonic(), 0
    with pytest.raises(openai.RateLimitError) as limited:
        while calls < 10 * CHAT_PER_MINUTE:
            calls += 1
            api.models.list()
    refills = (time.monotonic() - started) * CHAT_PER_MINUTE / 60
    assert calls <= CHAT_PER_MINUTE + refills + 1
    assert limited.value.response.headers["retry-after"]
    assert limited.value.body["type"] == "rate_limit_error"


async def test_concurrent_async_chats(mesh):
    async with async_client(mesh) as api:
        answers = await asyncio.gather(
            *(api.chat.completions.create(model=m, messages=HELLO, max_tokens=4) for m in ("phi", "mixtral"))
        )
    assert [a.model for a in answers] == ["phi", "mixtral"]


def test_embeddings(mesh):
    api = client(mesh)
    # The SDK asks for base64 unless told otherwise; both come back as floats.
    for encoding in ({}, {"encoding_format": "float"}):
        result = api.embeddings.create(
            model="all-MiniLM-L6-v2", input=["a capybara", "un capibara", "tax law"], **encoding
        )
        vectors = [d.embedding for d in result.data]
        assert [len(v) for v in vectors] == [384, 384, 384] and result.usage.prompt_tokens > 0
        norms = [sum(x * x for x in v) for v in vectors]
        assert all(abs(n - 1) < 1e-3 for n in norms)
        same, other = (sum(a * b for a, b in zip(vectors[0], v, strict=True)) for v in vectors[1:])
        assert same > other
    single = api.embeddings.create(model="x", input="hola")
    assert len(single.data) == 1 and single.data[0].index == 0
    with pytest.raises(openai.BadRequestError) as bad:
        api.embeddings.create(model="x", input=[[1, 2, 3]])
    assert bad.value.body["param"] == "input"


def test_audio_speech(mesh):
    api = client(mesh)
    wav = api.audio.speech.create(model="tts-1", input="Hola, soy un capibara.", voice="", response_format="wav")
    assert wav.response.headers["content-type"] == "audio/wav"
    sample_rate, samples = read_wav(wav.content)
    assert sample_rate > 0 and len(samples) > sample_rate // 4 and rms(samples) > 100
    pcm = api.audio.speech.create(model="tts-1", input="Hola.", voice="", response_format="pcm")
    assert pcm.response.headers["content-type"] == "audio/pcm" and len(pcm.content) > 1000
    for kwargs, param in (({"response_format": "mp3"}, "response_format"), ({"voice": "alloy"}, "voice")):
        with pytest.raises(openai.BadRequestError) as bad:
            api.audio.speech.create(model="tts-1", input="Hola.", **{"voice": "", **kwargs})
        assert bad.value.body["param"] == param


def test_the_conversation_id_extension_keeps_the_history_in_the_mesh(mesh):
    api = client(mesh)
    for text in ("My name is Ana.", "What is my name?"):
        api.chat.completions.create(
            model="phi",
            messages=[{"role": "user", "content": text}],
            max_tokens=6,
            extra_body={"capibara": {"conversation_id": "openai-c1"}},
        )
    status, stored, _ = mesh.request("GET", "/api/conversations/openai-c1", headers={"authorization": f"Bearer {KEY}"})
    assert status == 200, stored
    turns = [(t["role"], t["content"]) for t in stored["turns"]]
    assert [r for r, _ in turns] == ["ROLE_USER", "ROLE_ASSISTANT"] * 2
    assert turns[0][1] == "My name is Ana." and turns[2][1] == "What is my name?"


def test_the_native_api_takes_a_message_list_too(mesh):
    messages = [
        {"role": "ROLE_SYSTEM", "content": "You answer in one word."},
        {"role": "ROLE_USER", "content": "My name is Ana."},
        {"role": "ROLE_ASSISTANT", "content": "Hello Ana."},
        {"role": "ROLE_USER", "content": "What is my name?"},
    ]
    auth = {"authorization": f"Bearer {KEY}"}
    status, body, _ = mesh.request(
        "POST", "/api/chat", {"messages": messages, "model": "phi", "max_tokens": 6}, headers=auth
    )
    assert status == 200 and body["model_id"] == "phi" and body["response"], body
    status, body, _ = mesh.request("POST", "/api/chat", {"messages": messages, "message": "hola"}, headers=auth)
    assert status == 400 and "not both" in body["message"]


@pytest.mark.parametrize("model", ["phi", "mixtral"])
def test_response_format_json_schema_gives_json_that_parses(mesh, model):
    schema = {
        "type": "object",
        "properties": {"animal": {"type": "string", "maxLength": 12}, "legs": {"type": "integer"}},
        "required": ["animal", "legs"],
        "additionalProperties": False,
    }
    completion = client(mesh).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name an animal and its number of legs, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "animal", "schema": schema, "strict": True}},
        max_tokens=60,
        temperature=0,
    )
    answer = json.loads(completion.choices[0].message.content)
    assert set(answer) == {"animal", "legs"} and isinstance(answer["legs"], int), answer


async def test_a_busy_model_is_429_with_retry_after(mesh):
    url = mesh.backend_url("mixtral")
    await wait_until_idle(url)
    async with async_client(mesh) as api:
        stream = await long_stream(api)
        async for _ in stream:
            break
        with pytest.raises(openai.RateLimitError) as busy:
            await api.chat.completions.create(model="mixtral", messages=HELLO, max_tokens=3)
        await stream.close()
    assert int(busy.value.response.headers["retry-after"]) >= 1
    assert busy.value.body["type"] == "rate_limit_error" and "mixtral" in busy.value.body["message"]
    await wait_until_idle(url)


# Last: it kills mixtral's llama-server (the mesh is stopped after this module).
async def test_a_backend_dying_mid_stream_ends_it_with_an_in_band_error(mesh):
    body = {
        "model": "mixtral",
        "messages": [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}],
        "max_tokens": 1500,
        "temperature": 0,
        "stream": True,
    }
    frames = []
    headers = {"authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession() as session:
        url = mesh.base_url + "/v1/chat/completions"
        async with session.post(url, json=body, headers=headers, ssl=mesh.ssl_context()) as response:
            assert response.status == 200
            async for line in response.content:
                if line.startswith(b"data: "):
                    frames.append(line[6:].strip())
                    if len(frames) == 4:
                        for pid in mesh.llama_server_pids("mixtral"):
                            os.kill(pid, signal.SIGKILL)
    last = json.loads(frames[-1])
    assert set(last) == {"error"} and "mixtral" in last["error"]["message"], last
    assert last["error"]["code"] == "unavailable" and b"[DONE]" not in frames
