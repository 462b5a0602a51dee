"""Context core: builds the messages a model sees (facts it needs, data, memory). No gRPC."""

from __future__ import annotations

import typing
from dataclasses import dataclass

from capibara_grpc.chat.types import Message
from capibara_grpc.config import MeshConfig
from capibara_grpc.context import providers, toon
from capibara_grpc.context.addition import Addition
from capibara_grpc.context.memory import ConversationStore, Turn
from capibara_grpc.context.tokens import ModelTokens
from capibara_grpc.errors import InvalidArgument, InvalidField

if typing.TYPE_CHECKING:  # the MCP SDK is imported only where MCP servers are configured
    from capibara_grpc.context.mcp_sources import McpSources

# Chat templates add a few tokens around every message.
PER_MESSAGE_OVERHEAD = 8
NO_DATA = object()


@dataclass
class EnrichResult:
    messages: list[Message]
    added: list[Addition]

    @property
    def prompt(self) -> str:
        return "\n\n".join(f"[{m.role}] {m.content}" for m in self.messages)


@dataclass
class ToonEncoding:
    toon: str
    json_tokens: int
    toon_tokens: int
    json: str = ""
    # The counts are an estimate: the model's server has no tokenizer (or it failed).
    tokens_estimated: bool = False

    @property
    def savings(self) -> float:
        return 1 - self.toon_tokens / self.json_tokens if self.json_tokens else 0.0


def plain(value):
    """JSON from protobuf Values has only floats: give integral numbers back their int form."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


compact_json = toon.compact_json


class ContextEngine:
    def __init__(
        self, config: MeshConfig, store: ConversationStore, tokens: ModelTokens, mcp: McpSources | None = None
    ):
        self.config = config
        self.settings = config.context
        self.store = store
        self.tokens = tokens
        providers.warm_up_arithmetic()  # sympy workers start with the service, not at the first question
        self.mcp = mcp  # context.mcp_servers

    def _model(self, model_id: str) -> str:
        model_id = model_id or self.config.gateway.default_model
        self.config.model(model_id)
        return model_id

    async def toon_encode(
        self,
        value,
        model_id: str = "",
        options: toon.EncodeOptions = toon.EncodeOptions(),  # noqa: B008 (frozen)
    ) -> ToonEncoding:
        """`value` keeps its key order (parse JSON text with toon.parse_json, not a Struct)."""
        model_id = self._model(model_id)
        text = toon.encode(value, options)
        as_json = compact_json(value)
        json_tokens, toon_tokens = await self.tokens.count(model_id, as_json), await self.tokens.count(model_id, text)
        return ToonEncoding(text, json_tokens, toon_tokens, as_json, self.tokens.estimated(model_id))

    @staticmethod
    def toon_decode(text: str, options: toon.DecodeOptions = toon.DecodeOptions()):  # noqa: B008 (frozen)
        """The JSON value, keys in document order; an empty document is {} (spec section 5)."""
        return toon.decode(text, options)

    async def _data(self, data, model_id: str) -> Addition:
        """The data in the form that costs this model fewest tokens: TOON with a comma, tab or pipe
        delimiter, or compact JSON when that is shorter still."""
        encodings = {
            name: await self.toon_encode(data, model_id, toon.EncodeOptions(delimiter=delimiter))
            for delimiter, name in toon.DELIMITER_NAMES.items()
        }
        name, best = min(encodings.items(), key=lambda item: item[1].toon_tokens)  # first wins a tie
        budget = self.settings.max_data_tokens
        if best.toon_tokens <= best.json_tokens:
            text, tokens, form = best.toon, best.toon_tokens, f"TOON, {name}-delimited"
        else:
            text, tokens, form = best.json, best.json_tokens, "compact JSON"
        if tokens > budget:
            raise InvalidArgument(f"data is {tokens} tokens as {form}, over the budget of {budget} tokens")
        counts = ", ".join(f"TOON {n} {e.toon_tokens}" for n, e in encodings.items())
        estimated = " (estimated: the model's server has no tokenizer)" if best.tokens_estimated else ""
        return Addition(
            "data",
            f"Data ({form}):\n{text}",
            f"data passed with the request, as {form}: {tokens} tokens ({counts}, JSON {best.json_tokens}){estimated}",
        )

    async def enrich(
        self,
        message: str,
        conversation_id: str = "",
        data=NO_DATA,
        model_id: str = "",
        system_prompt: str | None = None,
        route: str = "",
        tool_results: list[Message] | None = None,
    ) -> EnrichResult:
        """`tool_results`: the new input is tool results answering the stored conversation's newest
        tool calls, sent after the history in place of `message` (which then only feeds the
        providers: the conversation's last user message)."""
        if not message.strip():
            raise InvalidArgument("message must not be empty or only whitespace")
        model_id = self._model(model_id)
        added = [
            a
            for a in (
                providers.datetime_context(message, self.settings.timezone),
                providers.identity_context(message, self.settings.assistant_name, self.settings.assistant_description),
                await providers.arithmetic_context_async(message),
            )
            if a
        ]
        if self.mcp is not None:
            added += await self.mcp.additions(message, route)
        if data is not NO_DATA and data is not None:
            added.append(await self._data(data, model_id))
        system = self.config.gateway.system_prompt if system_prompt is None else system_prompt
        system = "\n\n".join([system] * bool(system.strip()) + [a.content for a in added])
        head = [Message("system", system)] if system else []
        new_input = tool_results or [Message("user", message)]
        history = await self._history(conversation_id, model_id, head, new_input)
        if history:
            kept, total = history
            added.append(
                Addition(
                    "history",
                    f"{len(kept)} earlier turns",
                    f"conversation memory: the newest {len(kept)} of {total} turns fit the context window"
                    + (
                        " (tokens estimated: the model's server has no tokenizer)"
                        if self.tokens.estimated(model_id)
                        else ""
                    ),
                )
            )
            head += history_messages(kept, new_input)
        return EnrichResult(head + new_input, added)

    async def _history(self, conversation_id: str, model_id: str, head: list[Message], new_input: list[Message]):
        """(the newest turns that fit the window, how many are stored), or None. Turns go in whole
        groups: an assistant turn that called tools with the results stored after it, so a result
        never reaches the model without its call. When the new input is tool results, the group
        holding their calls is always kept (the model cannot read the results without them)."""
        if not conversation_id:
            if any(m.role == "tool" for m in new_input):
                raise InvalidField("messages", "tool results need the conversation_id of the conversation that called")
            return None
        turns = await self.store.turns(conversation_id)
        answering = [m for m in new_input if m.role == "tool"]
        if answering:
            check_tool_results(turns, answering)
        if not turns:
            return None
        window = await self.tokens.context_window(model_id)
        reserve = self.config.models[model_id].defaults.max_tokens
        used = sum([await self._cost(model_id, m) for m in head + new_input])
        budget = window - reserve - used
        kept: list[Turn] = []
        for number, group in enumerate(reversed(turn_groups(turns))):  # newest first
            cost = sum([await self._cost(model_id, t) for t in group])
            if cost > budget and not (number == 0 and answering):
                break
            budget -= cost
            kept[:0] = group
        return (kept, len(turns)) if kept else None

    async def _cost(self, model_id: str, turn: Turn | Message) -> int:
        """A message's tokens in the prompt: its text, and the name and arguments of each call."""
        text = turn.content + "".join(c.name + c.arguments for c in turn.tool_calls)
        return await self.tokens.count(model_id, text) + PER_MESSAGE_OVERHEAD * (1 + len(turn.tool_calls))


def history_messages(kept: list[Turn], new_input: list[Message]) -> list[Message]:
    """The kept turns as messages. A call that got no result (the client asked something else
    instead) is left out of its assistant message, and that message too when nothing else is left
    of it: OpenAI-compatible servers refuse a call without its result."""
    answered = {m.tool_call_id for m in [*kept, *new_input] if m.role == "tool"}
    messages = []
    for turn in kept:
        calls = [c for c in turn.tool_calls if c.id in answered]
        if turn.tool_calls and not calls and not turn.content.strip():
            continue
        messages.append(Message(turn.role, turn.content, calls, turn.tool_call_id))
    return messages


def turn_groups(turns: list[Turn]) -> list[list[Turn]]:
    """The turns in the groups the history is cut between: an assistant turn that called tools
    together with the tool results that follow it, every other turn alone. A tool result whose call
    is not before it (it cannot happen through the gateway) is dropped: a model would refuse it."""
    groups: list[list[Turn]] = []
    calls: set[str] = set()
    for turn in turns:
        if turn.role == "tool":
            if turn.tool_call_id in calls and groups:
                groups[-1].append(turn)
            continue
        calls = {c.id for c in turn.tool_calls}
        groups.append([turn])
    return groups


def check_tool_results(turns: list[Turn], results: list[Message]) -> None:
    """Tool results must answer calls of the conversation's newest assistant turn that called tools,
    each call once: what the model is asked to continue from."""
    calling = next((i for i in range(len(turns) - 1, -1, -1) if turns[i].tool_calls), None)
    if calling is None:
        raise InvalidField("messages", "the conversation has no tool calls for these tool results to answer")
    if any(t.role != "tool" for t in turns[calling + 1 :]):
        raise InvalidField("messages", "the conversation's newest tool calls were already answered")
    open_ids = {c.id for c in turns[calling].tool_calls} - {t.tool_call_id for t in turns[calling + 1 :]}
    seen: set[str] = set()
    for result in results:
        if result.tool_call_id not in open_ids or result.tool_call_id in seen:
            calls = ", ".join(sorted(open_ids)) or "none left"
            raise InvalidField(
                "messages",
                f"tool_call_id '{result.tool_call_id[:80]}' answers none of the conversation's open tool calls ({calls})",
            )
        seen.add(result.tool_call_id)
