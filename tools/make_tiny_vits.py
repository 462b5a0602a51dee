"""Write a tiny, untrained Coqui VITS model (checkpoint + config.json) into a folder.

Nothing can download Coqui weights on the build machine, so the tests and the speech benchmark
build a model with coqui-tts's own config and model classes (random weights, a few hundred KB)
and load it through exactly the path users use for a local model (speech.coqui.model_path).
It speaks noise, at the configured rate, with a length that follows the text.

Run with the Coqui environment's Python: .venv-coqui/bin/python tools/make_tiny_vits.py DIR
"""

from __future__ import annotations

import pathlib
import sys

SAMPLE_RATE = 16000


def make(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    import torch
    from TTS.tts.configs.shared_configs import BaseAudioConfig, CharactersConfig
    from TTS.tts.configs.vits_config import VitsArgs, VitsConfig
    from TTS.tts.models.vits import Vits

    torch.manual_seed(0)
    config = VitsConfig(
        audio=BaseAudioConfig(sample_rate=SAMPLE_RATE, fft_size=256, win_length=256, hop_length=64, num_mels=20),
        model_args=VitsArgs(
            out_channels=129,
            hidden_channels=16,
            hidden_channels_ffn_text_encoder=32,
            num_heads_text_encoder=2,
            num_layers_text_encoder=1,
            num_layers_posterior_encoder=1,
            num_layers_flow=1,
            upsample_rates_decoder=[8, 8],
            upsample_initial_channel_decoder=32,
            upsample_kernel_sizes_decoder=[16, 16],
            resblock_kernel_sizes_decoder=[3],
            resblock_dilation_sizes_decoder=[[1, 3, 5]],
            use_sdp=False,
            init_discriminator=False,
        ),
        use_phonemes=False,
        text_cleaner="multilingual_cleaners",
        characters=CharactersConfig(
            characters_class="TTS.tts.utils.text.characters.Graphemes",
            pad="<PAD>",
            eos="<EOS>",
            bos="<BOS>",
            blank="<BLNK>",
            characters="abcdefghijklmnopqrstuvwxyzáéíóúüñ0123456789",
            punctuations="!¡'(),-.:;¿? ",
        ),
        add_blank=True,
    )
    model = Vits(config)
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint, config_path = directory / "model.pth", directory / "config.json"
    torch.save({"model": model.state_dict(), "config": config.to_dict()}, checkpoint)
    config.save_json(str(config_path))
    return checkpoint, config_path


if __name__ == "__main__":
    for path in make(pathlib.Path(sys.argv[1])):
        print(path)
