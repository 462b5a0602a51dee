"""WAV (RIFF, PCM16 mono) headers: complete files, streaming headers, and parsing espeak's output."""

from __future__ import annotations

import struct

from capibara_grpc.errors import MeshError

# A streaming WAV's sizes are unknown when the header goes out; players read to the end of the
# stream when the sizes are the maximum.
_UNKNOWN_SIZE = 0xFFFFFFFF


def wav_header(sample_rate: int, data_bytes: int | None, channels: int = 1) -> bytes:
    """RIFF header for PCM16; `data_bytes` None = a stream of unknown length."""
    block_align = channels * 2
    data_size = _UNKNOWN_SIZE if data_bytes is None else data_bytes
    riff_size = _UNKNOWN_SIZE if data_bytes is None else 36 + data_bytes
    return (
        b"RIFF"
        + struct.pack("<I", riff_size)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block_align, block_align, 16)
        + b"data"
        + struct.pack("<I", data_size)
    )


def wav_file(pcm: bytes, sample_rate: int) -> bytes:
    return wav_header(sample_rate, len(pcm)) + pcm


def parse_pcm16_wav(data: bytes) -> tuple[int, bytes]:
    """(sample_rate, PCM16 samples) of a mono PCM16 WAV; tolerates streaming (unknown) sizes."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise MeshError("not a WAV file")
    position, sample_rate = 12, None
    while position + 8 <= len(data):
        chunk, size = data[position : position + 4], struct.unpack("<I", data[position + 4 : position + 8])[0]
        body = position + 8
        if chunk == b"fmt ":
            audio_format, channels, sample_rate = struct.unpack("<HHI", data[body : body + 8])
            bits = struct.unpack("<H", data[body + 14 : body + 16])[0]
            if (audio_format, channels, bits) != (1, 1, 16):
                raise MeshError(f"WAV is format {audio_format}, {channels} channels, {bits} bits; expected PCM16 mono")
        elif chunk == b"data":
            if sample_rate is None:
                raise MeshError("WAV data before its fmt chunk")
            end = len(data) if size == _UNKNOWN_SIZE else min(len(data), body + size)
            return sample_rate, data[body:end]
        position = body + size + (size & 1)
    raise MeshError("WAV has no data chunk")
