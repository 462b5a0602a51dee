"""Audio checks for the tests, independent of the service's own WAV code (stdlib `wave`)."""

from __future__ import annotations

import array
import io
import math
import wave


def read_wav(data: bytes) -> tuple[int, array.array]:
    """(sample rate, PCM16 samples) of a complete mono PCM16 WAV file; fails on anything else."""
    with wave.open(io.BytesIO(data)) as wav:
        assert wav.getnchannels() == 1 and wav.getsampwidth() == 2 and wav.getcomptype() == "NONE"
        frames = wav.readframes(wav.getnframes())
        assert len(frames) == wav.getnframes() * 2, "data chunk shorter than the header says"
        return wav.getframerate(), pcm16(frames)


def pcm16(data: bytes) -> array.array:
    samples = array.array("h")
    samples.frombytes(data)
    return samples


def rms(samples: array.array) -> float:
    return math.sqrt(sum(s * s for s in samples) / max(1, len(samples)))
