"""Speech service: text to audio, sentence by sentence (espeak-ng or Coqui TTS)."""
