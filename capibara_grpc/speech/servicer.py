"""gRPC face of the speech service: Synthesize (stream), Speak (HttpBody WAV), ListVoices."""

from __future__ import annotations

from google.api import httpbody_pb2

from capibara_grpc.audio.wav import wav_header
from capibara_grpc.speech.core import Speech
from capibara_grpc.stubs import speech_pb2, speech_pb2_grpc

WAV, PCM16 = speech_pb2.AUDIO_FORMAT_WAV, speech_pb2.AUDIO_FORMAT_PCM16


class SpeechServicer(speech_pb2_grpc.SpeechServiceServicer):
    def __init__(self, speech: Speech):
        self.speech = speech

    async def Synthesize(self, request, context):
        audio_format = PCM16 if request.format == PCM16 else WAV
        first = True
        async for chunk in self.speech.synthesize(request.text, request.voice, request.language):
            audio = chunk.pcm
            if first and audio_format == WAV:
                audio = wav_header(chunk.sample_rate, None) + audio
            first = False
            yield speech_pb2.SynthesizeResponse(
                audio=audio,
                format=audio_format,
                sample_rate=chunk.sample_rate,
                channels=1,
                sentence_index=chunk.sentence_index,
                sentence=chunk.sentence,
            )

    async def Speak(self, request, context):
        wav, _ = await self.speech.speak(request.text, request.voice, request.language)
        return httpbody_pb2.HttpBody(content_type="audio/wav", data=wav)

    async def ListVoices(self, request, context):
        return speech_pb2.ListVoicesResponse(
            voices=[
                speech_pb2.Voice(id=v.id, engine=v.engine, language=v.language, description=v.description)
                for v in self.speech.voices(request.language)
            ]
        )
