"""Context providers: each decides on its own whether a message needs what it knows.

Pure functions of the message (and the clock, the configured identity): no I/O, no gRPC.
"""

from __future__ import annotations

import ast
import datetime
import functools
import operator
import re
import zoneinfo

from capibara_grpc.context.addition import Addition
from capibara_grpc.text import normalize


@functools.lru_cache(maxsize=8)
def _folded(message: str) -> str:
    """normalize(message), once for the providers of one Enrich (each one asked for it)."""
    return normalize(message)


def _any_of(patterns: list[str]) -> re.Pattern:
    """One search for "any of the patterns is in the text": a match of one is a match of the alternation."""
    return re.compile("|".join(f"(?:{p})" for p in patterns))


# -- date and time ------------------------------------------------------------------------------

_DATE_PATTERNS = [
    r"\b(que|what)\s+(dia|day|fecha|date|hora|time)\s+(es|is)\b",
    r"\b(hoy|today|tonight|esta noche|manana|tomorrow|ayer|yesterday)\b.*\b(dia|day|fecha|date|es|is|sera|was|fue)\b",
    r"\b(dia|day|fecha|date)\b.*\b(hoy|today)\b",
    r"\bque hora\b|\bwhat time\b|\bhora actual\b|\bcurrent (time|date)\b",
    r"\b(cuantos|cuantas|how many)\s+(dias|days|semanas|weeks|meses|months|horas|hours)\s+(faltan|quedan|until|till|left|hasta|before)\b",
    r"\b(en que|what|which)\s+(ano|year|mes|month)\s+(estamos|is it|are we)\b",
    r"\bdia de la semana\b|\bday of the week\b",
    r"\b(cuanto falta|how long until|how long till)\b",
]
_DATE_RE = _any_of(_DATE_PATTERNS)


def datetime_context(message: str, tz: str, now: datetime.datetime | None = None) -> Addition | None:
    if not _DATE_RE.search(_folded(message)):
        return None
    zone = zoneinfo.ZoneInfo(tz)
    now = (now or datetime.datetime.now(datetime.UTC)).astimezone(zone)
    content = f"Current date and time: {now.strftime('%A %Y-%m-%d %H:%M')} ({tz})."
    return Addition("datetime", content, "the question depends on the current date or time")


# -- identity ----------------------------------------------------------------------------------

_IDENTITY_PATTERNS = [
    r"\b(quien|que) eres\b",
    r"\bwho are you\b",
    r"\bwhat are you\b",
    r"\bcomo te llamas\b",
    r"\btu nombre\b",
    r"\byour name\b",
    r"\beres (un|una) (robot|ia|bot|persona|humano|maquina)\b",
    r"\bare you (a|an) (robot|ai|bot|human|person|machine)\b",
    r"\bquien te (creo|hizo|programo|entreno)\b",
    r"\bwho (made|created|built|trained) you\b",
    r"\bque (puedes|sabes) hacer\b",
    r"\bwhat can you do\b",
    r"\bpresentate\b",
    r"\bintroduce yourself\b",
    r"\bhablame de ti\b",
    r"\btell me about yourself\b",
]
_IDENTITY_RE = _any_of(_IDENTITY_PATTERNS)


def identity_context(message: str, name: str, description: str) -> Addition | None:
    if not _IDENTITY_RE.search(_folded(message)):
        return None
    return Addition("identity", f"You are {name}. {description}".strip(), "the user asks about the assistant")


# -- arithmetic --------------------------------------------------------------------------------
# safe_eval is the small evaluator the first arithmetic provider used; the math package replaced it
# for messages, and it stays for callers of plain + - * / % ** on numbers.

_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
MAX_EXPONENT = 100
MAX_MAGNITUDE = 1e100


class _Unsafe(ValueError):
    pass


def safe_eval(expression: str) -> float | int:
    """Evaluate + - * / // % ** and parentheses on numbers only; anything else is refused."""

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](walk(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise _Unsafe("exponent too large")
            value = _OPERATORS[type(node.op)](left, right)
            if abs(value) > MAX_MAGNITUDE:
                raise _Unsafe("result too large")
            return value
        raise _Unsafe(f"not arithmetic: {type(node).__name__}")

    return walk(ast.parse(expression, mode="eval"))


def arithmetic_context(message: str) -> Addition | None:
    """Verified math (capibara_grpc/context/math): percentages, powers and roots, fractions, numbers
    in words, equations, derivatives and integrals, primes, combinations; computed by sympy in a
    worker process under a time limit. Blocks up to that limit, and on the first call until the worker
    has started: async code uses the _async form."""
    from capibara_grpc.context import math as verified_math

    verified_math.POOL.wait_ready(60)
    return verified_math.math_context(message)


def warm_up_arithmetic() -> None:
    from capibara_grpc.context import math as verified_math

    verified_math.POOL.warm_up()


async def arithmetic_context_async(message: str) -> Addition | None:
    from capibara_grpc.context import math as verified_math

    return await verified_math.math_context_async(message)
