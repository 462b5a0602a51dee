"""Speaking an answer while it is being written (ChatRequest.speak).

Each sentence goes to the speech service as soon as the model finishes it, so the audio is
mostly ready when the text ends; it is sent after the text, so no token waits for speech.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from capibara_gateway.events import ChatEvent
from capibara_grpc.audio import AudioChunk
from capibara_grpc.audio.text import SentenceBuffer, speakable
from capibara_grpc.chat.types import Token
from capibara_grpc.errors import StreamError

# (text, voice id, timeout_s) -> audio chunks of that text
SynthesizeFn = Callable[[str, str, float], AsyncIterator[AudioChunk]]
_END = object()


class SpokenAnswer:
    def __init__(self, synthesize: SynthesizeFn, voice: str, timeout_s: float):
        self.synthesize = synthesize
        self.voice = voice
        self.timeout_s = timeout_s
        self._sentences = SentenceBuffer()
        self._todo: asyncio.Queue = asyncio.Queue()
        self._audio: asyncio.Queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._speak_in_order())

    def feed(self, text: str) -> None:
        for sentence in self._sentences.feed(text):
            self._todo.put_nowait(sentence)

    def finish(self) -> None:
        for sentence in self._sentences.flush():
            self._todo.put_nowait(sentence)
        self._todo.put_nowait(_END)

    async def _speak_in_order(self) -> None:
        index = 0
        try:
            while (sentence := await self._todo.get()) is not _END:
                text = speakable(sentence)
                if not any(c.isalnum() for c in text):
                    continue
                async for chunk in self.synthesize(text, self.voice, self.timeout_s):
                    self._audio.put_nowait(AudioChunk(chunk.pcm, chunk.sample_rate, index, sentence))
                index += 1
            self._audio.put_nowait(_END)
        except Exception as exc:  # noqa: BLE001 - handed to the reader, who reports it in-band
            self._audio.put_nowait(exc)

    async def audio(self) -> AsyncIterator[AudioChunk]:
        """The audio, in sentence order; raises what the speech service raised."""
        while (item := await self._audio.get()) is not _END:
            if isinstance(item, Exception):
                raise item
            yield item

    async def aclose(self) -> None:
        self._worker.cancel()
        await asyncio.gather(self._worker, return_exceptions=True)


async def spoken(
    answer: AsyncIterator[ChatEvent], synthesize: SynthesizeFn, voice: str, timeout_s: float
) -> AsyncIterator[ChatEvent]:
    """The answer's events, then its audio. Nothing is spoken after an in-band error; a speech
    failure once the text is out is the stream's in-band error."""
    speaker = SpokenAnswer(synthesize, voice, timeout_s)
    try:
        async with contextlib.aclosing(answer):
            async for event in answer:
                if isinstance(event, Token):
                    speaker.feed(event.text)
                yield event
                if isinstance(event, StreamError):
                    return
        speaker.finish()
        try:
            async for chunk in speaker.audio():
                yield chunk
        except Exception as exc:  # noqa: BLE001 - the text is out; the speech failure is in-band
            yield StreamError.from_exception(exc, "speech", "the answer could not be spoken: ")
    finally:
        await speaker.aclose()
