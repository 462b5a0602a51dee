"""Token counts and context windows, from each model's server where it can tell (its real
tokenizer, its reported window), else a stated estimate and the configured or default window:
a chat never fails because a server lacks an optional endpoint (capibara_grpc.upstream)."""

from __future__ import annotations

import collections

import aiohttp

from capibara_grpc.config import MeshConfig
from capibara_grpc.upstream.client import Upstream


class ModelTokens:
    def __init__(self, config: MeshConfig, session: aiohttp.ClientSession):
        self.config = config
        self.upstreams = {model_id: Upstream(config, model_id, session) for model_id in config.models}
        # Conversation history is counted again on every request: remember recent counts.
        self._counts: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()
        self._counts_max = 20000
        # Models whose counts were estimated (their server has no tokenizer, or it failed).
        self.estimating: set[str] = set()

    async def count(self, model_id: str, text: str) -> int:
        """Tokens of `text` for the model: its server's tokenizer, else an estimate (not cached,
        so that a tokenizer back from a failure is used again)."""
        key = (model_id, text)
        if key in self._counts:
            self._counts.move_to_end(key)
            return self._counts[key]
        count, exact = await self.upstreams[model_id].count_tokens(text)
        if not exact:
            self.estimating.add(model_id)
            return count
        self.estimating.discard(model_id)
        self._counts[key] = count
        while len(self._counts) > self._counts_max:
            self._counts.popitem(last=False)
        return count

    def estimated(self, model_id: str) -> bool:
        """Whether the model's last count was an estimate."""
        return model_id in self.estimating

    async def context_window(self, model_id: str) -> int:
        return await self.upstreams[model_id].context_window()
