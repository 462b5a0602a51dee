"""Text folding shared by the router, the context service and consensus: one meaning of "the
same words" for routing, for context triggers and for comparing answers. Plain Python: no model
libraries are loaded by importing it."""

from __future__ import annotations

import re
import unicodedata

_NON_WORD = re.compile(r"[^\w+#]+")


def normalize(text: str) -> str:
    """Lowercase, accents removed, punctuation folded to spaces ('¿Cómo estás?' -> 'como estas')."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(_NON_WORD.sub(" ", plain).split())
