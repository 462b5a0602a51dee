"""Audio the speech service makes and the gateway passes on: spoken sentences (AudioChunk), WAV
framing (wav.py) and the text rules of speaking (text.py). Shared, so the gateway speaks an answer
through the speech service's client without importing the service's core."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AudioChunk:
    pcm: bytes  # PCM16 mono
    sample_rate: int
    sentence_index: int
    sentence: str
