"""Local calls (capibara_grpc/local_calls.py) behave as the same call over gRPC: each case runs once
over a real grpc.aio server on loopback and once in-process, against the same servicer behind the
same error mapping, and the caller must not be able to tell them apart (but for the speed)."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from capibara_grpc import tracing
from capibara_grpc.errors import RETRY_AFTER, ResourceExhausted, Unavailable, error_mapping_server
from capibara_grpc.local_calls import LocalChannel
from capibara_grpc.stubs import inference_pb2, inference_pb2_grpc


class Servicer(inference_pb2_grpc.InferenceServiceServicer):
    """Generate: one token per word of model_id ("slow" waits 0.3 s before each; "fail-after-2"
    fails after two; "busy" is refused with a Retry-After). ListModels: the caller's metadata."""

    def __init__(self):
        self.ended: list[str] = []  # how each Generate ended: done, closed, cancelled

    async def Generate(self, request, context):
        try:
            for index, word in enumerate(request.model_id.split()):
                if word == "busy":
                    raise ResourceExhausted("every slot is busy", retry_after_s=3)
                if word == "slow":
                    await asyncio.sleep(0.3)
                if word == "fail-after-2" and index == 2:
                    raise Unavailable("the model server went away")
                yield inference_pb2.GenerateResponse(token=inference_pb2.TokenChunk(text=word, index=index))
            self.ended.append("done")
        except GeneratorExit:
            self.ended.append("closed")
            raise
        except asyncio.CancelledError:
            self.ended.append("cancelled")
            raise

    async def ListModels(self, request, context):
        remaining = context.time_remaining()
        return inference_pb2.ListModelsResponse(
            models=[
                inference_pb2.ModelInfo(model_id=f"{k}={v}", status="deadline" if remaining else "none")
                for k, v in context.invocation_metadata()
                if k.startswith("x-")
            ]
        )


@contextlib.asynccontextmanager
async def both_ways():
    """(servicer, {"network": stub, "local": stub}) over one server."""
    servicer = Servicer()
    local_methods = {}
    server = error_mapping_server(local=local_methods)
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    network = grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=tracing.client_interceptors())
    local = LocalChannel(local_methods, grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
    try:
        yield (
            servicer,
            {
                "network": inference_pb2_grpc.InferenceServiceStub(network),
                "local": inference_pb2_grpc.InferenceServiceStub(local),
            },
        )
    finally:
        await network.close()
        await local.close()
        await server.stop(None)


async def tokens(stub, model_id: str, timeout: float | None = 5.0) -> list[str]:
    return [
        r.token.text async for r in stub.Generate(inference_pb2.GenerateRequest(model_id=model_id), timeout=timeout)
    ]


async def refusal(awaitable) -> tuple[grpc.StatusCode, str, dict]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable
    error = caught.value
    return error.code(), error.details(), {k: v for k, v in error.trailing_metadata() or () if k == RETRY_AFTER}


async def test_a_stream_and_its_failures_look_the_same_both_ways():
    async with both_ways() as (servicer, stubs):
        seen = {}
        for way, stub in stubs.items():
            servicer.ended.clear()
            answer = await tokens(stub, "one two three")
            assert servicer.ended == ["done"], way  # read to its end, the handler ends, not cancelled
            cut = await refusal(tokens(stub, "a b fail-after-2 d"))
            busy = await refusal(tokens(stub, "busy"))
            seen[way] = (answer, cut, busy)
        assert seen["local"] == seen["network"]
        assert seen["local"] == (
            ["one", "two", "three"],
            (grpc.StatusCode.UNAVAILABLE, "the model server went away", {}),
            (grpc.StatusCode.RESOURCE_EXHAUSTED, "every slot is busy", {RETRY_AFTER: "3"}),
        )


async def test_metadata_and_the_request_id_reach_the_handler_and_the_deadline_too():
    async with both_ways() as (_, stubs):
        seen = {}
        token = tracing.current_request_id.set("req-42")
        try:
            for way, stub in stubs.items():
                response = await stub.ListModels(
                    inference_pb2.ListModelsRequest(), timeout=5, metadata=tracing.VALIDATED
                )
                seen[way] = sorted((m.model_id, m.status) for m in response.models)
        finally:
            tracing.current_request_id.reset(token)
        assert seen["local"] == seen["network"]
        assert seen["local"] == [("x-capibara-validated=1", "deadline"), ("x-request-id=req-42", "deadline")]


async def test_a_stream_past_its_deadline_is_deadline_exceeded_and_its_handler_stops():
    async with both_ways() as (servicer, stubs):
        for way, stub in stubs.items():
            servicer.ended.clear()
            code, _, _ = await refusal(tokens(stub, "a slow slow slow", timeout=0.5))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED, way
            for _ in range(50):  # over the network the server learns it a moment later
                if servicer.ended:
                    break
                await asyncio.sleep(0.02)
            assert servicer.ended == ["cancelled"], way


async def test_a_caller_that_stops_listening_ends_the_handler():
    async with both_ways() as (servicer, stubs):
        for way, stub in stubs.items():
            servicer.ended.clear()
            call = stub.Generate(inference_pb2.GenerateRequest(model_id="a slow slow slow"), timeout=5)
            async for _ in call:
                break
            call.cancel()
            for _ in range(50):
                if servicer.ended:
                    break
                await asyncio.sleep(0.02)
            assert servicer.ended in (["closed"], ["cancelled"]), way


async def test_a_cancelled_caller_cancels_the_local_handler_at_once():
    async with both_ways() as (servicer, stubs):
        task = asyncio.create_task(tokens(stubs["local"], "a slow slow"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert servicer.ended == ["cancelled"]


async def test_a_unary_call_past_its_deadline_is_deadline_exceeded():
    class Slow(Servicer):
        async def ListModels(self, request, context):
            await asyncio.sleep(1)
            return inference_pb2.ListModelsResponse()

    local_methods = {}
    server = error_mapping_server(local=local_methods)
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(Slow(), server)
    channel = LocalChannel(local_methods, grpc.aio.insecure_channel("127.0.0.1:1"))
    local = inference_pb2_grpc.InferenceServiceStub(channel)
    code, _, _ = await refusal(local.ListModels(inference_pb2.ListModelsRequest(), timeout=0.2))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    await channel.close()


async def test_methods_not_served_here_go_over_the_network():
    empty = LocalChannel({}, grpc.aio.insecure_channel("127.0.0.1:1"))
    stub = inference_pb2_grpc.InferenceServiceStub(empty)
    code, _, _ = await refusal(stub.ListModels(inference_pb2.ListModelsRequest(), timeout=2))
    assert code == grpc.StatusCode.UNAVAILABLE  # nothing listens on port 1: it was a network call
    await empty.close()
