"""Speech with espeak-ng, the embedded default: REST WAV, gRPC streaming, chat `speak`, bad input.
The Coqui engine has its own module (test_speech_coqui.py): it needs its own environment."""

from __future__ import annotations

import base64
import time

import grpc
import pytest

from capibara_grpc.stubs import gateway_pb2, gateway_pb2_grpc, speech_pb2, speech_pb2_grpc
from tests.support.audio import pcm16, read_wav, rms
from tests.support.channels import edge_channel
from tests.support.sse import read_events

ESPEAK_RATE = 22050
SENTENCES = [f"Esta es la frase número {i}, dicha por el servicio de voz." for i in range(1, 13)]


def test_voices_are_listed_per_engine_and_language(mesh):
    status, body, _ = mesh.request("GET", "/api/tts/voices")
    assert status == 200, body
    voices = {v["id"]: v for v in body["voices"]}
    assert voices["espeak:es"]["language"] == "es" and voices["espeak:en-us"]["language"] == "en"
    assert {v["engine"] for v in voices.values()} == {"espeak"}
    status, english, _ = mesh.request("GET", "/api/tts/voices?language=en-US")
    assert status == 200 and english["voices"]
    assert {v["language"] for v in english["voices"]} == {"en"}


def test_speak_returns_a_playable_wav_that_grows_with_the_text(mesh):
    status, short, headers = mesh.request("POST", "/api/tts/speak", {"text": "Hola."})
    assert status == 200, short
    assert headers["content-type"] == "audio/wav"
    rate, short_samples = read_wav(short)
    assert rate == ESPEAK_RATE
    assert rms(short_samples) > 300, "the audio is silent"
    status, long, _ = mesh.request("POST", "/api/tts/speak", {"text": " ".join(SENTENCES[:3]), "voice": "espeak:es"})
    assert status == 200
    _, long_samples = read_wav(long)
    assert len(long_samples) > 5 * len(short_samples)
    assert len(long_samples) / rate > 5  # three sentences of ten words each take seconds to say


def test_english_and_spanish_voices_speak_differently(mesh):
    text = {"text": "The weather is nice today."}
    _, english, _ = mesh.request("POST", "/api/tts/speak", {**text, "language": "en"})
    _, spanish, _ = mesh.request("POST", "/api/tts/speak", {**text, "voice": "espeak:es"})
    assert read_wav(english)[1] != read_wav(spanish)[1]


async def test_synthesize_streams_sentence_by_sentence(mesh):
    text = " ".join(SENTENCES)
    request = speech_pb2.SynthesizeRequest(text=text, voice="espeak:es", format=speech_pb2.AUDIO_FORMAT_PCM16)
    async with edge_channel(mesh) as channel:
        stub = speech_pb2_grpc.SpeechServiceStub(channel)
        started = time.perf_counter()
        chunks = []
        async for chunk in stub.Synthesize(request, timeout=120):
            chunks.append((time.perf_counter() - started, chunk))
    total = chunks[-1][0]
    first_at, first = chunks[0]
    assert first.format == speech_pb2.AUDIO_FORMAT_PCM16 and first.sample_rate == ESPEAK_RATE and first.channels == 1
    assert [c.sentence_index for _, c in chunks] == sorted(c.sentence_index for _, c in chunks)
    assert {c.sentence_index for _, c in chunks} == set(range(len(SENTENCES)))
    assert first.sentence == SENTENCES[0]
    # The first sentence is one twelfth of the work: its audio comes long before the last.
    assert first_at < total / 2, (first_at, total)
    # The stream is the same audio as the complete WAV, cut at sentence boundaries.
    streamed = b"".join(c.audio for _, c in chunks)
    _, whole, _ = mesh.request("POST", "/api/tts/speak", {"text": text, "voice": "espeak:es"})
    assert pcm16(streamed) == read_wav(whole)[1]


async def test_synthesize_as_wav_starts_with_a_streaming_header(mesh):
    request = speech_pb2.SynthesizeRequest(text="Uno. Dos.", format=speech_pb2.AUDIO_FORMAT_WAV)
    async with edge_channel(mesh) as channel:
        chunks = [c async for c in speech_pb2_grpc.SpeechServiceStub(channel).Synthesize(request, timeout=60)]
    head = chunks[0].audio
    assert head[:4] == b"RIFF" and head[8:16] == b"WAVEfmt "
    assert int.from_bytes(head[24:28], "little") == ESPEAK_RATE
    assert not any(c.audio.startswith(b"RIFF") for c in chunks[1:])


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"text": ""}, 400, "empty"),
        ({"text": " \n "}, 400, "empty"),
        ({"text": "a" * 3001}, 400, "3001 characters, over the limit of 3000"),
        ({"text": "hola", "voice": "espeak:fr"}, 404, "unknown voice 'espeak:fr'"),
        ({"text": "hola", "voice": "../../../etc/passwd"}, 404, "unknown voice"),
        ({"text": "hola", "voice": "/usr/share/espeak-ng-data/voices/es"}, 404, "unknown voice"),
        ({"text": "hola", "language": "fr"}, 404, "no espeak voice speaks 'fr'"),
        ({"text": "hola", "language": "../es"}, 400, "not a language tag"),
        ({"text": "hola", "voice": "espeak:en-us", "language": "es"}, 400, "speaks 'en', not 'es'"),
        ({"text": "<speak>hola</speak>"}, 400, "markup"),
        ({"text": "hola\x07 mundo"}, 400, "control character U+0007"),
        ({"text": "hola\x1b[31m"}, 400, "control character U+001B"),
        ({"text": "... !!! ???"}, 400, "nothing to speak"),
    ],
)
def test_bad_speech_input_gets_a_clear_error(mesh, body, status, words):
    got, error, headers = mesh.request("POST", "/api/tts/speak", body)
    assert got == status, error
    assert headers["content-type"].startswith("application/json")
    assert words in error["message"], error["message"]


def test_text_at_the_limit_is_spoken(mesh):
    text = ("Una frase corta para hablar. " * 110)[:3000]
    status, wav, _ = mesh.request("POST", "/api/tts/speak", {"text": text}, timeout=300)
    assert status == 200, wav
    rate, samples = read_wav(wav)
    assert len(samples) / rate > 60


async def test_chat_speaks_the_answer_after_the_text(mesh):
    status, events, _ = await read_events(
        mesh,
        "/api/chat/stream",
        {
            "message": "Say hello in one short sentence.",
            "model": "phi",
            "max_tokens": 30,
            "temperature": 0,
            "speak": True,
            "voice": "espeak:en-us",
        },
    )
    assert status == 200, events
    kinds = [next(iter(e)) for _, e in events]
    assert kinds[0] == "routing"
    done = kinds.index("done")
    assert "token" in kinds[:done] and "audio" not in kinds[:done], kinds
    assert kinds[done + 1 :] and set(kinds[done + 1 :]) == {"audio"}, kinds
    audio = [e["audio"] for _, e in events[done + 1 :]]
    assert {a["sample_rate"] for a in audio} == {ESPEAK_RATE}
    samples = pcm16(b"".join(base64.b64decode(a["pcm16"]) for a in audio))
    assert len(samples) / ESPEAK_RATE > 0.5 and rms(samples) > 300
    answer = "".join(e["token"]["text"] for _, e in events if "token" in e)
    spoken = " ".join(a["sentence"] for a in audio)
    assert set(spoken.split()) <= set(answer.split())
    assert [a["sentence_index"] for a in audio] == sorted(a["sentence_index"] for a in audio)


async def test_chat_without_speak_has_no_audio(mesh):
    status, events, _ = await read_events(
        mesh, "/api/chat/stream", {"message": "hola", "model": "phi", "max_tokens": 5}
    )
    assert status == 200 and events
    assert not any("audio" in e for _, e in events)


async def test_chat_with_an_unknown_voice_fails_before_streaming(mesh):
    async with edge_channel(mesh) as channel:
        stub = gateway_pb2_grpc.ChatServiceStub(channel)
        request = gateway_pb2.ChatRequest(message="hola", model="phi", max_tokens=5, speak=True, voice="espeak:klingon")
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in stub.Chat(request, timeout=30):
                pass
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown voice 'espeak:klingon'" in error.value.details()


async def test_chat_speaks_over_grpc_too(mesh):
    async with edge_channel(mesh) as channel:
        stub = gateway_pb2_grpc.ChatServiceStub(channel)
        request = gateway_pb2.ChatRequest(message="Di hola.", model="phi", max_tokens=20, temperature=0, speak=True)
        events = [e async for e in stub.Chat(request, timeout=120)]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.index("done") < kinds.index("audio")
    pcm = b"".join(e.audio.pcm16 for e in events if e.WhichOneof("event") == "audio")
    assert rms(pcm16(pcm)) > 300
