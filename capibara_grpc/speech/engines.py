"""Speech engines behind one interface: voices, a sample rate, and audio for one sentence.

`EspeakEngine` runs espeak-ng (the embedded default). `CoquiEngine` loads a coqui-tts model by
catalogue name or from a local checkpoint and config; it imports torch, so it lives only in the
environment that has coqui-tts (see requirements-coqui.txt).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from capibara_grpc.audio.wav import parse_pcm16_wav
from capibara_grpc.config import CoquiConfig, EspeakConfig, MeshConfig
from capibara_grpc.errors import MeshError, Unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Voice:
    id: str  # "<engine>:<name>", what clients send
    engine: str
    language: str  # primary language subtag, "es" or "en"
    description: str
    # What the engine itself is given: an espeak voice name, a Coqui speaker (or "").
    engine_voice: str = ""


class SpeechEngine(Protocol):
    name: str
    sample_rate: int

    def voices(self) -> list[Voice]: ...

    def synthesize(self, sentence: str, voice: Voice) -> AsyncIterator[bytes]:
        """PCM16 mono samples at `sample_rate` for one sentence, in one or more pieces."""
        ...


# espeak-ng voices offered: id suffix -> (espeak voice, language, description).
ESPEAK_VOICES = {
    "es": ("es", "es", "Spanish (Spain), espeak-ng"),
    "es-419": ("es-419", "es", "Spanish (Latin America), espeak-ng"),
    "en-us": ("en-us", "en", "English (America), espeak-ng"),
    "en-gb": ("en-gb", "en", "English (Great Britain), espeak-ng"),
}


class EspeakEngine:
    name = "espeak"
    sample_rate = 22050

    def __init__(self, settings: EspeakConfig):
        self.settings = settings

    def voices(self) -> list[Voice]:
        return [
            Voice(f"espeak:{key}", "espeak", language, description, espeak_voice)
            for key, (espeak_voice, language, description) in ESPEAK_VOICES.items()
        ]

    async def synthesize(self, sentence: str, voice: Voice) -> AsyncIterator[bytes]:
        # The text goes in on stdin, so it can never be read as an option; the voice name comes
        # from ESPEAK_VOICES, never from the request.
        process = await asyncio.create_subprocess_exec(
            self.settings.binary,
            "--stdin",
            "--stdout",
            "-b",
            "1",
            "-v",
            voice.engine_voice,
            "-s",
            str(self.settings.words_per_minute),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            wav, errors = await process.communicate(sentence.encode("utf-8"))
        finally:
            if process.returncode is None:  # cancelled: do not leave espeak running
                process.kill()
                await process.wait()
        if process.returncode != 0:
            raise Unavailable(f"espeak-ng failed (exit {process.returncode}): {errors.decode(errors='replace')[:200]}")
        try:
            rate, pcm = parse_pcm16_wav(wav)
        except MeshError as exc:
            raise Unavailable(f"espeak-ng wrote no usable audio: {exc.message}") from None
        if rate != self.sample_rate:
            raise Unavailable(f"espeak-ng wrote {rate} Hz audio, expected {self.sample_rate} Hz")
        yield pcm


def _float_to_pcm16(samples) -> bytes:
    import numpy as np

    audio = np.clip(np.asarray(samples, dtype=np.float32).reshape(-1), -1.0, 1.0)
    return (audio * 32767.0).astype("<i2").tobytes()


_SAFE_NAME = re.compile(r"^[\w .\-()']{1,80}$")


class CoquiEngine:
    """One coqui-tts model. Inference runs in a worker thread, one sentence at a time (the model
    is not safe to share between threads). XTTS models stream: audio of a sentence comes in
    pieces as the model produces it."""

    name = "coqui"

    def __init__(self, settings: CoquiConfig, config: MeshConfig):
        from TTS.api import TTS  # imported here: torch is not in the router's environment

        if settings.model_path:
            self.tts = TTS(
                model_path=str(config.resolve_path(settings.model_path)),
                config_path=str(config.resolve_path(settings.config_path)),
                progress_bar=False,
            )
            source = settings.model_path
        else:
            self.tts = TTS(model_name=settings.model_name, progress_bar=False)
            source = settings.model_name
        self.synthesizer = self.tts.synthesizer
        self.model = self.synthesizer.tts_model
        self.sample_rate = int(self.synthesizer.output_sample_rate)
        self.is_xtts = type(self.model).__name__ == "Xtts"
        self._model_lock = threading.Lock()
        self._request_lock = asyncio.Lock()
        model_languages = [lang.split("-")[0].lower() for lang in (self.tts.languages or [])]
        languages = [lang for lang in settings.languages if not model_languages or lang in model_languages]
        speakers = [s for s in (self.tts.speakers or []) if _SAFE_NAME.match(s)]
        self._voices = [
            Voice(
                f"coqui:{speaker or 'default'}{'-' + language if len(languages) > 1 else ''}",
                "coqui",
                language,
                f"Coqui TTS {source}" + (f", speaker {speaker}" if speaker else ""),
                speaker,
            )
            for language in languages
            for speaker in (speakers or [""])
        ]
        self._model_languages = set(self.tts.languages or [])
        log.info(
            "coqui model %s loaded: %d Hz, %d voices, xtts=%s",
            source,
            self.sample_rate,
            len(self._voices),
            self.is_xtts,
        )

    def voices(self) -> list[Voice]:
        return list(self._voices)

    def _language_argument(self, voice: Voice) -> str | None:
        if not self._model_languages:
            return None
        return next(
            (lang for lang in self._model_languages if lang.split("-")[0].lower() == voice.language), voice.language
        )

    def _whole_sentence(self, sentence: str, voice: Voice) -> bytes:
        with self._model_lock:
            samples = self.tts.tts(
                sentence,
                speaker=voice.engine_voice or None,
                language=self._language_argument(voice),
                split_sentences=False,
            )
        return _float_to_pcm16(samples)

    def _xtts_pieces(self, sentence: str, voice: Voice):
        """XTTS streaming inference: pieces of one sentence as the decoder produces them."""
        speaker = self.model.speaker_manager.speakers[voice.engine_voice]
        for piece in self.model.inference_stream(
            sentence, self._language_argument(voice), speaker["gpt_cond_latent"], speaker["speaker_embedding"]
        ):
            yield _float_to_pcm16(piece.cpu().numpy())

    def _next_piece(self, pieces, done):
        with self._model_lock:
            return next(pieces, done)

    async def synthesize(self, sentence: str, voice: Voice) -> AsyncIterator[bytes]:
        # One sentence at a time (the asyncio lock keeps requests in order); the thread lock also
        # covers a worker thread still running after its request was cancelled.
        async with self._request_lock:
            if not self.is_xtts:
                yield await asyncio.to_thread(self._whole_sentence, sentence, voice)
                return
            pieces, done = self._xtts_pieces(sentence, voice), object()
            try:
                while (piece := await asyncio.to_thread(self._next_piece, pieces, done)) is not done:
                    yield piece
            finally:
                with contextlib.suppress(ValueError):  # still running in a cancelled worker thread
                    pieces.close()
