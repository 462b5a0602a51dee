"""Which model answers a chat: the one the request names, else the router's pick, else the
configured default. Routing never fails a chat: when the router is down the decision says so."""

from __future__ import annotations

import collections
import logging

from capibara_gateway.events import ChatInput, RoutingDecision
from capibara_gateway.protocols import Context, RouteFn
from capibara_grpc.config import MeshConfig
from capibara_grpc.errors import to_mesh_error

log = logging.getLogger(__name__)
ROUTER_TIMEOUT_S = 2.0


class RecentTurns:
    """The last few user messages of recent conversations, so the router can keep a
    conversation's route for short follow-ups. Bounded: old conversations are forgotten."""

    def __init__(self, turns: int = 4, conversations: int = 10000):
        self.turns = turns
        self.conversations = conversations
        self._recent: collections.OrderedDict[str, list[str]] = collections.OrderedDict()

    def get(self, conversation_id: str) -> list[str]:
        return list(self._recent.get(conversation_id, [])) if conversation_id else []

    def add(self, conversation_id: str, message: str) -> None:
        if not conversation_id:
            return
        turns = self._recent.pop(conversation_id, [])
        self._recent[conversation_id] = (turns + [message])[-self.turns :]
        while len(self._recent) > self.conversations:
            self._recent.popitem(last=False)


class Routing:
    def __init__(self, config: MeshConfig, route: RouteFn | None, context: Context | None):
        self.config = config
        # The router service (None when it is not deployed: the configured default model).
        self.route_with_router = route
        # The context service, for the conversation's recent turns that every replica shares.
        self.context = context
        self.recent = RecentTurns()

    async def decide(self, chat: ChatInput) -> RoutingDecision:
        if chat.model:
            return RoutingDecision(chat.model, "explicit", 1.0, "request", "the request named the model")
        default = self.config.gateway.default_model
        if not chat.use_router:
            return RoutingDecision(default, "default", 1.0, "default", "use_router is false: configured default model")
        if self.route_with_router is None:
            return RoutingDecision(
                default, "default", 1.0, "default", "no router service is deployed: configured default model"
            )
        try:
            decision = await self.route_with_router(chat.message, await self._recent_turns(chat), ROUTER_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - routing must not fail the chat; the event says so
            error = to_mesh_error(exc, "routing")
            return RoutingDecision(
                default,
                "default",
                0.0,
                "default",
                f"router unavailable ({error.code.name}: {error.message}): configured default model",
                fallback=True,
            )
        return RoutingDecision(
            decision.model_id,
            decision.route_name,
            decision.confidence,
            "router",
            decision.reasoning,
            fallback=decision.fallback,
            scores=[(route, score) for route, _, score in decision.scores],
            next_best=[model for _, model, _ in sorted(decision.scores, key=lambda s: -s[2])],
        )

    def remember(self, chat: ChatInput) -> None:
        """This process's memory of the conversation's turns (used without a context service)."""
        self.recent.add(chat.conversation_id, chat.message)

    async def _recent_turns(self, chat: ChatInput) -> list[str]:
        """The conversation's last user messages, for the router's follow-up rule: from the
        context service's memory, which every gateway replica shares, else from this process."""
        if not chat.conversation_id:
            return []
        if self.context is not None:
            try:
                return await self.context.recent_user_turns(chat.conversation_id, self.recent.turns, ROUTER_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - a routing hint; the chat goes on without it
                log.warning(
                    "recent turns unavailable (%s); routing without them", to_mesh_error(exc, "recent turns").message
                )
        return self.recent.get(chat.conversation_id)
