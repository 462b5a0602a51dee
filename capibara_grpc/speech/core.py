"""Speech core: pick the voice, check the text, stream audio sentence by sentence. No gRPC here.

Voices are looked up by id in the engines' own lists: a voice id is never a path, and an id that
is not listed is NOT_FOUND before any engine sees it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from capibara_grpc.audio import AudioChunk
from capibara_grpc.audio.text import check_text, split_sentences
from capibara_grpc.audio.wav import wav_file
from capibara_grpc.config import MeshConfig
from capibara_grpc.errors import InvalidArgument, NotFound
from capibara_grpc.speech.engines import SpeechEngine, Voice

_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")


def primary_language(language: str) -> str:
    """'es-ES' -> 'es'; INVALID_ARGUMENT for something that is not a language tag."""
    if not _LANGUAGE.match(language):
        raise InvalidArgument(f"language '{language[:40]}' is not a language tag such as 'es' or 'en-US'")
    return re.split(r"[-_]", language)[0].lower()


class Speech:
    def __init__(self, config: MeshConfig, engines: list[SpeechEngine]):
        self.settings = config.speech
        self.engines = {engine.name: engine for engine in engines}
        self._voices = {voice.id: voice for engine in engines for voice in engine.voices()}

    def voices(self, language: str = "") -> list[Voice]:
        wanted = primary_language(language) if language else None
        return [v for v in self._voices.values() if wanted is None or v.language == wanted]

    def voice(self, voice_id: str, language: str) -> Voice:
        language = primary_language(language) if language else ""
        if voice_id:
            voice = self._voices.get(voice_id)
            if voice is None:
                raise NotFound(f"unknown voice '{voice_id[:80]}' (available: {', '.join(self._voices)})")
            if language and voice.language != language:
                raise InvalidArgument(f"voice '{voice_id}' speaks '{voice.language}', not '{language}'")
            return voice
        language = language or self.settings.default_language
        engine = self.settings.engine if self.settings.engine in self.engines else next(iter(self.engines))
        for voice in self._voices.values():
            if voice.engine == engine and voice.language == language:
                return voice
        spoken = sorted({v.language for v in self._voices.values() if v.engine == engine})
        raise NotFound(f"no {engine} voice speaks '{language}' (languages: {', '.join(spoken)})")

    async def synthesize(self, text: str, voice_id: str = "", language: str = "") -> AsyncIterator[AudioChunk]:
        """Audio of each sentence as soon as it is made; everything is checked before the first."""
        voice = self.voice(voice_id, language)
        sentences = split_sentences(check_text(text, self.settings.max_text_chars))
        if not sentences:
            raise InvalidArgument("text has nothing to speak (no letters or digits)")
        engine = self.engines[voice.engine]
        for index, sentence in enumerate(sentences):
            async for pcm in engine.synthesize(sentence, voice):
                if pcm:
                    yield AudioChunk(pcm, engine.sample_rate, index, sentence)

    async def speak(self, text: str, voice_id: str = "", language: str = "") -> tuple[bytes, int]:
        """One complete WAV file and its sample rate."""
        pcm, rate = [], self.engines[self.voice(voice_id, language).engine].sample_rate
        async for chunk in self.synthesize(text, voice_id, language):
            pcm.append(chunk.pcm)
        return wav_file(b"".join(pcm), rate), rate


def build_engines(config: MeshConfig) -> list[SpeechEngine]:
    """espeak-ng whenever its binary is there; Coqui when a model is configured."""
    import shutil

    from capibara_grpc.speech.engines import CoquiEngine, EspeakEngine

    engines: list[SpeechEngine] = []
    if shutil.which(config.speech.espeak.binary):
        engines.append(EspeakEngine(config.speech.espeak))
    if config.speech.coqui.configured:
        engines.append(CoquiEngine(config.speech.coqui, config))
    if not engines:
        raise RuntimeError("no speech engine: install espeak-ng or configure speech.coqui")
    return engines
