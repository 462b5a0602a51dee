"""Speech: time to first audio and real-time factor, per engine, over gRPC.

Starts `capibara serve speech` for each engine on its own port: espeak-ng (the embedded default)
under .venv, and Coqui under .venv-coqui with the tiny VITS model of tools/make_tiny_vits.py
(random weights: nothing can be downloaded here, so its figures show the engine's overhead on a
very small network, not the speed of a real XTTS or VITS voice). Each text is synthesized
`--runs` times with SpeechService/Synthesize (PCM16).

    .venv/bin/python benchmarks/speech.py [--runs 5]

time to first audio = request sent -> first audio chunk received;
real-time factor    = synthesis time / duration of the audio (below 1 = faster than speech).
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import grpc
import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from capibara_grpc.stubs import speech_pb2, speech_pb2_grpc
from tests.support.mesh import REPO, VENV_BIN, launched_model, mesh_config

PORT_BASE = 29500
COQUI_PYTHON = REPO / ".venv-coqui" / "bin" / "python"
TEXTS = {
    "1 sentence": "Hola, soy Capibara y te respondo enseguida.",
    "5 sentences": " ".join(
        [
            "El servicio de voz habla frase por frase.",
            "La primera frase suena antes de que la última esté lista.",
            "Así el usuario no espera al texto completo.",
            "Cada fragmento lleva su frecuencia de muestreo.",
            "Este es el final de la prueba.",
        ]
    ),
}


async def measure(address: str, voice: str, text: str, runs: int) -> tuple[list[float], list[float]]:
    first_audio, rtf = [], []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = speech_pb2_grpc.SpeechServiceStub(channel)
        request = speech_pb2.SynthesizeRequest(text=text, voice=voice, format=speech_pb2.AUDIO_FORMAT_PCM16)
        async for _ in stub.Synthesize(request, timeout=300):  # warm-up
            pass
        for _ in range(runs):
            started, first, samples, rate = time.perf_counter(), None, 0, 1
            async for chunk in stub.Synthesize(request, timeout=300):
                first = first or time.perf_counter() - started
                samples += len(chunk.audio) // 2
                rate = chunk.sample_rate
            elapsed = time.perf_counter() - started
            first_audio.append(first * 1000)
            rtf.append(elapsed / (samples / rate))
    return first_audio, rtf


def serve_speech(python: pathlib.Path, config: dict, directory: pathlib.Path) -> subprocess.Popen:
    path = directory / "capibara.yaml"
    path.write_text(yaml.safe_dump(config))
    server = subprocess.Popen(
        [str(python), "-m", "capibara_grpc.cli", "--config", str(path), "serve", "speech"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    for line in server.stdout:
        if "serving speech" in line:
            return server
    raise SystemExit(f"speech service did not start ({python})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(
        f"\nSpeechService/Synthesize over gRPC (plaintext, loopback), median of {args.runs} runs; "
        f"{platform.machine()}, {platform.node()}, {time.strftime('%Y-%m-%d')}"
    )
    print(f"{'engine':34} {'text':12} {'first audio ms':>15} {'real-time factor':>17}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        engines = [("espeak-ng", VENV_BIN / "python", {}, "espeak:es")]
        if COQUI_PYTHON.exists():
            made = subprocess.run(
                [str(COQUI_PYTHON), str(REPO / "tools" / "make_tiny_vits.py"), str(tmp / "vits")],
                capture_output=True,
                text=True,
                check=True,
            )
            checkpoint, config_path = made.stdout.split()
            engines.append(
                (
                    "coqui (tiny VITS, random weights)",
                    COQUI_PYTHON,
                    {"engine": "coqui", "coqui": {"model_path": checkpoint, "config_path": config_path}},
                    "coqui:default-es",
                )
            )
        else:
            print("(no .venv-coqui: run `make coqui` to measure the Coqui engine)")
        for name, python, speech, voice in engines:
            config = mesh_config(
                tmp / "state", PORT_BASE, {"gpt-oss-20b": launched_model(PORT_BASE + 80)}, router=False
            )
            config["speech"] = speech
            server = serve_speech(python, config, tmp)
            try:
                for label, text in TEXTS.items():
                    first, rtf = asyncio.run(
                        measure(f"127.0.0.1:{config['services']['speech']['port']}", voice, text, args.runs)
                    )
                    print(f"{name:34} {label:12} {statistics.median(first):15.1f} {statistics.median(rtf):17.3f}")
            finally:
                server.terminate()
                server.wait(10)


if __name__ == "__main__":
    main()
