"""Token counts and context windows from the model servers themselves (their real tokenizers)."""

from __future__ import annotations

import collections

import aiohttp

from capibara_grpc.config import MeshConfig
from capibara_grpc.errors import Unavailable


class ModelTokens:
    def __init__(self, config: MeshConfig, session: aiohttp.ClientSession):
        self.config = config
        self.session = session
        self._windows: dict[str, int] = {}
        # Conversation history is counted again on every request: remember recent counts.
        self._counts: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()
        self._counts_max = 20000

    def _url(self, model_id: str) -> str:
        return self.config.backend_base_url(model_id)

    async def _call(self, model_id: str, method: str, path: str, body: dict | None = None) -> dict:
        url = self._url(model_id) + path
        try:
            async with self.session.request(
                method, url, json=body, timeout=aiohttp.ClientTimeout(total=10)
            ) as response:
                if response.status != 200:
                    raise Unavailable(f"model '{model_id}' backend answered HTTP {response.status} to {path}")
                return await response.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise Unavailable(
                f"model '{model_id}' is unavailable: {url} unreachable ({exc.__class__.__name__})"
            ) from exc

    async def count(self, model_id: str, text: str) -> int:
        """Tokens of `text` for the model (llama-server /tokenize; vLLM's answers with `count`)."""
        key = (model_id, text)
        if key in self._counts:
            self._counts.move_to_end(key)
            return self._counts[key]
        model = self.config.model(model_id)
        body = {"content": text, "prompt": text, "model": model.backend.model_name or model_id, "add_special": False}
        result = await self._call(model_id, "POST", "/tokenize", body)
        count = int(result["count"]) if "count" in result else len(result.get("tokens", []))
        self._counts[key] = count
        while len(self._counts) > self._counts_max:
            self._counts.popitem(last=False)
        return count

    async def context_window(self, model_id: str) -> int:
        if model_id not in self._windows:
            props = await self._call(model_id, "GET", "/props")
            self._windows[model_id] = int((props.get("default_generation_settings") or {}).get("n_ctx") or 2048)
        return self._windows[model_id]
