"""What text may be spoken, and how it is cut into sentences.

Sentences are the unit of streaming: the first one is synthesized and sent while the rest wait.
`SentenceBuffer` cuts incrementally, so the gateway can start speaking an answer that is still
being generated. No torch in here: the gateway imports it.
"""

from __future__ import annotations

import re
import unicodedata

from capibara_grpc.errors import InvalidArgument

# A sentence ends at . ! ? … (optionally followed by closing quotes or brackets) and whitespace.
# A dot after a single capital ("J. R. R. Tolkien") is an initial, not an end.
_SENTENCE_END = re.compile(r"(?<!\b[A-Z])([.!?…]+[\"'»”)\]]*)(\s+)")
_MARKUP = re.compile(r"<\s*/?\s*[A-Za-z!?][^<>]*>")
# Sentences longer than this are cut at a comma or a space, so no single piece delays the stream.
MAX_PIECE_CHARS = 400


def check_text(text: str, limit: int) -> str:
    """The text to speak, or INVALID_ARGUMENT saying what is wrong with it."""
    if not text.strip():
        raise InvalidArgument("text must not be empty or only whitespace")
    if len(text) > limit:
        raise InvalidArgument(f"text is {len(text)} characters, over the limit of {limit}")
    for position, char in enumerate(text):
        if unicodedata.category(char) in ("Cc", "Cs", "Co") and char not in "\n\r\t":
            raise InvalidArgument(f"text contains control character U+{ord(char):04X} at position {position}")
    markup = _MARKUP.search(text)
    if markup:
        raise InvalidArgument(f"text contains markup ({markup.group(0)[:40]!r}); send plain text")
    return text


def _cut_long(sentence: str) -> list[str]:
    pieces = []
    while len(sentence) > MAX_PIECE_CHARS:
        window = sentence[:MAX_PIECE_CHARS]
        cut = max(window.rfind(", "), window.rfind("; "))
        cut = cut + 1 if cut > MAX_PIECE_CHARS // 2 else window.rfind(" ")
        cut = cut if cut > 0 else MAX_PIECE_CHARS
        pieces.append(sentence[:cut].strip())
        sentence = sentence[cut:].strip()
    return pieces + [sentence] if sentence else pieces


class SentenceBuffer:
    """Feed text as it arrives; take complete sentences out; flush the rest at the end."""

    def __init__(self):
        self._pending = ""

    def feed(self, text: str) -> list[str]:
        self._pending += text
        sentences = []
        while True:
            end = _SENTENCE_END.search(self._pending)
            if end is None:
                break
            sentence = self._pending[: end.end(1)].strip()
            self._pending = self._pending[end.end() :]
            sentences += _cut_long(sentence) if sentence else []
        # Text with no sentence end for a long while (a list, code) is still spoken in pieces.
        if len(self._pending) > MAX_PIECE_CHARS:
            *done, self._pending = _cut_long(self._pending)
            sentences += done
        return sentences

    def flush(self) -> list[str]:
        rest, self._pending = self._pending.strip(), ""
        return _cut_long(rest) if rest else []


def split_sentences(text: str) -> list[str]:
    buffer = SentenceBuffer()
    return [s for s in buffer.feed(text) + buffer.flush() if any(c.isalnum() for c in s)]


_MARKDOWN = re.compile(r"[*_#`~|>]+")


def speakable(text: str) -> str:
    """A model's answer made fit to speak: markup, markdown symbols and control characters go
    (the answer is already shown as text; speech should not read out asterisks or fail on them)."""
    text = _MARKUP.sub(" ", text)
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Cs", "Co") and c not in "\n\t" else c for c in text)
    return re.sub(r"[ \t]+", " ", _MARKDOWN.sub(" ", text)).strip()
