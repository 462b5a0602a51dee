"""The Coqui engine, for real: a tiny VITS model built with coqui-tts's own classes (random
weights; nothing can be downloaded here), saved as a checkpoint and config, and loaded through
speech.coqui.model_path, the path users take for a local model. `capibara up` then runs the
speech service under the Coqui environment's Python (.venv-coqui), as its own process."""

from __future__ import annotations

import subprocess
import time

import pytest

from capibara_grpc.stubs import speech_pb2, speech_pb2_grpc
from tests.support.audio import pcm16, read_wav, rms
from tests.support.channels import edge_channel
from tests.support.mesh import REPO, launched_model, mesh_config, processes_using, start_mesh, stop_mesh

COQUI_PYTHON = REPO / ".venv-coqui" / "bin" / "python"
TINY_VITS_RATE = 16000  # tools/make_tiny_vits.py


@pytest.fixture(scope="module")
def coqui_mesh(tmp_path_factory):
    directory = tmp_path_factory.mktemp("coqui")
    made = subprocess.run(
        [str(COQUI_PYTHON), str(REPO / "tools" / "make_tiny_vits.py"), str(directory / "vits")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr
    checkpoint, config_path = made.stdout.split()
    config = mesh_config(directory / "state", 28000, {"gpt-oss-20b": launched_model(28080)}, router=False)
    config["speech"] = {
        "engine": "coqui",
        "coqui": {"model_path": checkpoint, "config_path": config_path, "python": str(COQUI_PYTHON)},
    }
    mesh = start_mesh(directory, config)
    try:
        yield mesh
    finally:
        stop_mesh(mesh)


def test_speech_runs_in_the_coqui_environment_as_its_own_process(coqui_mesh):
    assert any("serve speech" in p for p in processes_using(str(COQUI_PYTHON)))


def test_coqui_and_espeak_voices_are_listed(coqui_mesh):
    status, body, _ = coqui_mesh.request("GET", "/api/tts/voices")
    assert status == 200, body
    by_engine = {}
    for voice in body["voices"]:
        by_engine.setdefault(voice["engine"], set()).add((voice["id"], voice["language"]))
    assert by_engine["coqui"] == {("coqui:default-es", "es"), ("coqui:default-en", "en")}
    assert ("espeak:es", "es") in by_engine["espeak"]


def test_coqui_wav_over_rest_has_the_model_rate_and_grows_with_the_text(coqui_mesh):
    lengths = []
    for text in ["Hola.", "Hola, ¿qué tal estás hoy? Muy bien, gracias por preguntar."]:
        # No voice: speech.engine is coqui, so the default voice is Coqui's for the language.
        status, wav, headers = coqui_mesh.request("POST", "/api/tts/speak", {"text": text, "language": "es"})
        assert status == 200, wav
        assert headers["content-type"] == "audio/wav"
        rate, samples = read_wav(wav)
        assert rate == TINY_VITS_RATE
        assert rms(samples) > 100, "the audio is silent"
        lengths.append(len(samples))
    assert lengths[1] > 2 * lengths[0]


async def test_coqui_streams_sentence_by_sentence(coqui_mesh):
    sentences = [f"Frase número {i} del modelo pequeño." for i in range(8)]
    request = speech_pb2.SynthesizeRequest(
        text=" ".join(sentences), voice="coqui:default-es", format=speech_pb2.AUDIO_FORMAT_PCM16
    )
    async with edge_channel(coqui_mesh) as channel:
        started, chunks = time.perf_counter(), []
        async for chunk in speech_pb2_grpc.SpeechServiceStub(channel).Synthesize(request, timeout=120):
            chunks.append((time.perf_counter() - started, chunk))
    assert chunks[0][1].sample_rate == TINY_VITS_RATE and chunks[0][1].sentence == sentences[0]
    assert [c.sentence_index for _, c in chunks] == sorted(c.sentence_index for _, c in chunks)
    assert {c.sentence_index for _, c in chunks} == set(range(len(sentences)))
    assert chunks[0][0] < chunks[-1][0]
    assert rms(pcm16(b"".join(c.audio for _, c in chunks))) > 100


def test_espeak_still_speaks_beside_coqui(coqui_mesh):
    status, wav, _ = coqui_mesh.request("POST", "/api/tts/speak", {"text": "Hello.", "voice": "espeak:en-us"})
    assert status == 200
    assert read_wav(wav)[0] == 22050


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"text": "hola", "voice": "coqui:../../model.pth"}, 404, "unknown voice"),
        ({"text": "hola", "voice": "coqui:default-es", "language": "en"}, 400, "speaks 'es', not 'en'"),
        ({"text": ""}, 400, "empty"),
    ],
)
def test_bad_input_to_the_coqui_engine(coqui_mesh, body, status, words):
    got, error, _ = coqui_mesh.request("POST", "/api/tts/speak", body)
    assert got == status, error
    assert words in error["message"]
