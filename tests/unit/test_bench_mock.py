"""benchmarks/openai_mock.py speaks OpenAI's wire format: the openai SDK parses its answers, plain
and streamed, as it parses OpenAI's own (a mock that only our gateway understood would make the
peers benchmark compare gateways on different work)."""

from __future__ import annotations

import asyncio
import contextlib

import openai
import pytest

from benchmarks.openai_mock import Connection, MockServer


@contextlib.asynccontextmanager
async def mock(tokens: int = 8):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(MockServer(tokens)), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    try:
        yield client
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


MESSAGES = [{"role": "user", "content": "hi"}]


async def test_a_chat_completion_as_the_sdk_reads_it():
    async with mock() as client:
        answer = await client.chat.completions.create(model="mock-8", messages=MESSAGES)
    assert answer.object == "chat.completion"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.role == "assistant"
    assert len(answer.choices[0].message.content.split()) == 8
    assert answer.usage.completion_tokens == 8
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 8


@pytest.mark.parametrize("include_usage", [True, False])
async def test_a_stream_as_the_sdk_reads_it(include_usage):
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    async with mock() as client:
        stream = await client.chat.completions.create(model="mock-256", messages=MESSAGES, stream=True, **options)
        chunks = [chunk async for chunk in stream]
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 256
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    if include_usage:  # the last chunk: no choices, the usage; every other one: usage null
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 256
        assert all(c.usage is None for c in chunks[:-1])
    else:
        assert all(c.usage is None for c in chunks)


async def test_max_tokens_cuts_the_answer_with_finish_reason_length():
    async with mock() as client:
        answer = await client.chat.completions.create(model="mock-256", messages=MESSAGES, max_tokens=5)
    assert answer.choices[0].finish_reason == "length"
    assert len(answer.choices[0].message.content.split()) == 5


async def test_models_and_errors():
    async with mock() as client:
        models = await client.models.list()
        assert "mock-8" in [m.id for m in models.data]
        with pytest.raises(openai.NotFoundError):
            await client.post("/nowhere", cast_to=object, body={})
