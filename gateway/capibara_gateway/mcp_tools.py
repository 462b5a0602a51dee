"""MCP tools run by the mesh (request `mcp_tools`): the model is offered tools of the configured MCP
servers as OpenAI function tools (`<server>__<tool>`, the tool's inputSchema as parameters); each
call it makes to them is run through the context service (which holds the sessions), its result
goes back as a tool message, and the model generates again, until it answers text.

The loop wraps one model's generation and yields the same stream (Token, Reasoning, ToolCallDelta,
one Finished, its usage summed over the rounds) plus a ToolStep per call run. Bounds: at most
`context.mcp_tool_steps` calls per chat (the round after the last one is asked with tool_choice
"none", so the model answers), each call the server's `timeout_s`, each result
`context.mcp_tool_result_chars`. A tool that fails, times out or does not exist is a result with
is_error, which the model reads: the chat goes on. A call to one of the client's own tools
(request `tools`) ends the loop and goes back to the client, as without MCP tools.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from capibara_gateway.events import ChatInput, ToolStep
from capibara_grpc.chat.types import Finished, GenerateFn, Message, SamplingParams, Token, ToolCall, ToolCallDelta
from capibara_grpc.config import MeshConfig, mcp_offer
from capibara_grpc.errors import InvalidField, ResourceExhausted

log = logging.getLogger(__name__)
LIST_TIMEOUT_S = 10.0
# On top of the server's timeout_s, for the gRPC call to the context service.
CALL_MARGIN_S = 2.0


def check(config: MeshConfig, chat: ChatInput) -> None:
    """The request's mcp_tools against the configuration: 400 naming what is not allowed."""
    mcp_offer.allowed(config.context.mcp_servers, chat.mcp_tools, chat.key_id)
    if chat.consensus:
        raise InvalidField("mcp_tools", "consensus does not take tools: name a model or let the router choose")
    if chat.model and not config.models[chat.model].takes_tools:
        raise InvalidField("model", f"model '{chat.model}' does not take tools (models.{chat.model}.tools is false)")
    if not any(m.takes_tools for m in config.models.values()):
        raise InvalidField("mcp_tools", "no model of this mesh takes tools (models.<id>.tools)")


@dataclass
class Offer:
    """What the model is offered: function name -> (server, tool), and the tools as JSON text."""

    functions: dict[str, tuple[str, str]]
    tools: list[str]


async def offer(context, chat: ChatInput) -> Offer:
    """The tools the request names, as the servers list them now (ContextService/ListMcpTools)."""
    listed = await context.list_mcp_tools(chat.mcp_tools, LIST_TIMEOUT_S)
    client_names = {_tool_name(t) for t in chat.params.tools}
    functions, tools = {}, []
    for tool in listed:
        name = mcp_offer.function_name(tool.server, tool.name)
        if name in client_names:
            raise InvalidField("mcp_tools", f"'{tool.server}.{tool.name}' is offered as '{name}', a name in tools")
        if name in functions:
            continue
        functions[name] = (tool.server, tool.name)
        schema = json.loads(tool.input_schema_json or "{}") or {"type": "object", "properties": {}}
        function = {"name": name, "description": tool.description[:1024], "parameters": schema}
        tools.append(json.dumps({"type": "function", "function": function}, ensure_ascii=False, separators=(",", ":")))
    return Offer(functions, tools)


def _tool_name(tool_json: str) -> str:
    try:
        return json.loads(tool_json).get("function", {}).get("name", "")
    except (ValueError, AttributeError):
        return ""


class ToolLoop:
    def __init__(self, config: MeshConfig, context, generate: GenerateFn, tools: Offer):
        self.config = config
        self.context = context
        self.generate = generate
        self.offer = tools
        self.max_steps = config.context.mcp_tool_steps

    async def run(
        self, model_id: str, messages: list[Message], params: SamplingParams, timeout_s: float
    ) -> AsyncIterator[Token | ToolCallDelta | ToolStep | Finished]:
        deadline = time.monotonic() + timeout_s
        messages = list(messages)
        params = dataclasses.replace(params, tools=[*params.tools, *self.offer.tools])
        client_tools = {_tool_name(t) for t in params.tools} - set(self.offer.functions)
        steps, token_index, usage = 0, 0, Finished("stop")
        while True:
            last_round = steps >= self.max_steps
            round_params = dataclasses.replace(params, tool_choice="none") if last_round else params
            mesh_calls: dict[int, ToolCall] = {}
            client_index: dict[int, int] = {}
            text: list[str] = []
            finished = None
            stream = self.generate(model_id, messages, round_params, max(0.1, deadline - time.monotonic()))
            async for item in stream:
                if isinstance(item, Finished):
                    finished = item
                    break
                if isinstance(item, ToolCallDelta):
                    if item.index not in mesh_calls and item.index not in client_index:
                        if item.name in client_tools:
                            client_index[item.index] = len(client_index)
                        else:  # an MCP tool, or a name nobody offered: the model is told
                            mesh_calls[item.index] = ToolCall("", "", "")
                    if item.index in client_index:
                        yield dataclasses.replace(item, index=client_index[item.index])
                        continue
                    call = mesh_calls[item.index]
                    call.id, call.name = call.id or item.id, call.name or item.name
                    call.arguments += item.arguments
                    continue
                if isinstance(item, Token):
                    text.append(item.text)
                    item = dataclasses.replace(item, index=token_index)
                    token_index += 1
                yield item
            if finished is None:
                return  # the caller reports a stream without a final event
            _add_usage(usage, finished)
            if client_index or not mesh_calls:
                yield dataclasses.replace(
                    finished,
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    reasoning_tokens=usage.reasoning_tokens,
                    finish_reason="tool_calls" if client_index else _finish(finished),
                )
                return
            if last_round:
                raise ResourceExhausted(  # tool_choice none, and the model still called tools
                    f"the model still called tools after {self.max_steps} steps (context.mcp_tool_steps)"
                )
            calls = [mesh_calls[i] for i in sorted(mesh_calls)]
            for call in calls:
                call.id = call.id or f"call_{uuid.uuid4().hex[:24]}"
            budget = self.max_steps - steps
            results = await asyncio.gather(*(self._run(call) for call in calls[:budget]))
            steps += len(results)
            limit_note = f"not run: the limit of {self.max_steps} tool calls per chat is reached; answer now"
            results += [ToolStep(c.name, c.arguments, limit_note, True, 0.0) for c in calls[budget:]]
            messages.append(Message("assistant", "".join(text), tool_calls=calls))
            for call, step in zip(calls, results, strict=True):
                yield step
                messages.append(Message("tool", step.result, tool_call_id=call.id))

    async def _run(self, call: ToolCall) -> ToolStep:
        started = time.perf_counter()
        target = self.offer.functions.get(call.name)
        if target is None:
            offered = ", ".join(self.offer.functions)
            text = f"there is no tool '{call.name[:64]}' (tools: {offered})"
            return ToolStep(call.name, call.arguments, text, True, 0.0)
        server, tool = target
        timeout_s = self.config.context.mcp_servers[server].timeout_s + CALL_MARGIN_S
        try:
            result, is_error, ms = await self.context.call_mcp_tool(server, tool, call.arguments or "{}", timeout_s)
        except Exception as exc:  # noqa: BLE001 - the context service failing is the tool failing
            why = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            result, is_error = f"the tool could not be run: {why}"[:2000], True
            ms = (time.perf_counter() - started) * 1000
        log.info("mcp tool %s run: %s in %.0f ms", call.name, "error" if is_error else "ok", ms)
        return ToolStep(call.name, call.arguments, result, is_error, ms, server, tool)


def _add_usage(total: Finished, finished: Finished) -> None:
    total.prompt_tokens += finished.prompt_tokens
    total.completion_tokens += finished.completion_tokens
    total.reasoning_tokens += finished.reasoning_tokens


def _finish(finished: Finished) -> str:
    return "stop" if finished.finish_reason == "tool_calls" else finished.finish_reason
