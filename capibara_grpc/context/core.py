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
from capibara_grpc.errors import InvalidArgument

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
    ) -> EnrichResult:
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
        user = Message("user", message)
        history = await self._history(conversation_id, model_id, head + [user])
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
            head += [Message(t.role, t.content) for t in kept]
        return EnrichResult(head + [user], added)

    async def _history(self, conversation_id: str, model_id: str, fixed: list[Message]):
        if not conversation_id:
            return None
        turns = await self.store.turns(conversation_id)
        if not turns:
            return None
        window = await self.tokens.context_window(model_id)
        reserve = self.config.models[model_id].defaults.max_tokens
        used = sum([await self.tokens.count(model_id, m.content) + PER_MESSAGE_OVERHEAD for m in fixed])
        budget = window - reserve - used
        kept: list[Turn] = []
        for turn in reversed(turns):  # newest first
            cost = await self.tokens.count(model_id, turn.content) + PER_MESSAGE_OVERHEAD
            if cost > budget:
                break
            budget -= cost
            kept.append(turn)
        kept.reverse()
        return (kept, len(turns)) if kept else None
