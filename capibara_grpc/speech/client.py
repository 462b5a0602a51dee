"""The speech service as seen by the gateway: PCM16 audio of one piece of text."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from capibara_grpc.audio import AudioChunk
from capibara_grpc.stubs import speech_pb2, speech_pb2_grpc

# Voices change only when the speech service restarts with another model.
VOICES_TTL_S = 30.0


class SpeechClient:
    def __init__(self, channel: grpc.aio.Channel):
        self.stub = speech_pb2_grpc.SpeechServiceStub(channel)
        self._voices: list[str] = []
        self._voices_read_at = -VOICES_TTL_S

    async def voice_ids(self, timeout_s: float) -> list[str]:
        if time.monotonic() - self._voices_read_at > VOICES_TTL_S:
            response = await self.stub.ListVoices(speech_pb2.ListVoicesRequest(), timeout=timeout_s)
            self._voices = [voice.id for voice in response.voices]
            self._voices_read_at = time.monotonic()
        return self._voices

    async def synthesize(self, text: str, voice: str, timeout_s: float) -> AsyncIterator[AudioChunk]:
        request = speech_pb2.SynthesizeRequest(text=text, voice=voice, format=speech_pb2.AUDIO_FORMAT_PCM16)
        async for response in self.stub.Synthesize(request, timeout=timeout_s):
            yield AudioChunk(response.audio, response.sample_rate, response.sentence_index, response.sentence)
