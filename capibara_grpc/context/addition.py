"""What a context provider adds to a prompt: a piece of context, its kind and why it was added.
Its own module because every provider returns it, the verified-math package included."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Addition:
    kind: str
    content: str
    reason: str
