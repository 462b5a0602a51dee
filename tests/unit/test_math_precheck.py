"""The math detection's pre-check (detect.may_ask) never changes what find_tasks finds: over the
repository's messages (the math provider's labelled set, the router's evaluation sets, the context
tests' messages), edge cases of its own reasoning and random mixes of math and chat words, the
full detection finds a task only where the pre-check says one may be; and it does rule out the
common chat message, which is what it is for."""

from __future__ import annotations

import pathlib
import random
import unicodedata

import pytest
import yaml

from capibara_grpc.context.math import detect

DATA = pathlib.Path(__file__).parents[1] / "data"
MATH = [c["message"] for c in yaml.safe_load((DATA / "math_cases.yaml").read_text())["cases"]]
ROUTER = [q["text"] for name in ("router_eval.yaml", "router_holdout.yaml") for q in yaml.safe_load((DATA / name).read_text())["queries"]]  # fmt: skip
CONTEXT = [
    "qué día es hoy", "¿qué hora es?", "how many days until Christmas", "qué es Python", "What is a date palm?",
    "my birthday is on 1990-05-01", "¿quién eres?", "who made you?", "tengo 3 gatos y 2 perros",
    "nací en 1990-05-01", "2**99999", "1/0", "la versión 2.0 salió en 2019", "call me at 555-1234",
    "what is python?", "¿cuánto es la raíz cuadrada de 1764?", "solve the system x + y = 10, x - y = 2",
    "hello there", "hola", "Write a haiku about the sea.",
]  # fmt: skip
# Each reason the pre-check gives: digits in any script, number words, words the clauses turn into
# digits, constants, kinds that work on variables, "=", symbols normalize() rewrites, and a word
# with the trailing courtesy glued on (the one place the clauses cut inside a word).
EDGES = [
    "sqrt pithanks", "what is e times epls", "dos más dosgracias", "twoplease plus three", "sqrt pi", "e e", "what is pi e", "el doble de veinte",
    "half of twelve", "la mitad de cien", "un tercio de 90", "seven squared", "cinco al cubo", "twice seven",
    "thrice nine", "2 raised to the third", "derivative of x^2", "derivada de sin x", "d/dx of x sin x",
    "integral of x dx", "integra x^2 de 0 a 1", "la primitiva de cos x", "factor xy", "factoriza x^2 - 1",
    "descomposicion de x^2 - 4", "solve x = y", "2x + 3 = 11", "x² + 1", "√16", "∫ x dx", "½ + ¼",
    "٣ + ٤", "２＋２", "³√27", "ｓｑｒｔ ｐｉ", "three hundred and two minus one", "un millon entre mil",
    "what is one thousand times two, thanks", "what's sqrt e exactly", "cuanto es e por e por favor",
    "the derivative of x with respect to t", "x + y", "xy", "t t", "y", "don't do that", "x-ray",
]  # fmt: skip
CHAT = ["hello", "hi", "hola", "thanks", "gracias", "what", "is", "the", "of", "capital", "france", "por", "y", "a"]
MATHS = ["+", "-", "*", "/", "^", "=", "(", ")", "%", "x", "y", "t", "pi", "e", "sqrt", "sin", "mas", "plus", "por"]
MATHS += ["times", "entre", "half", "dos", "two", "twenty", "mil", "tercera", "squared", "twice", "derivative"]
MATHS += ["integral", "factor", "solve", "please", "gracias", "cuanto es", "what is", "?", "!", ".", ",", "7", "1.5"]


def _random_messages(count: int) -> list[str]:
    rng = random.Random(29)
    vocabulary = CHAT + MATHS
    messages = []
    for _ in range(count):
        tokens = rng.choices(vocabulary, k=rng.randint(1, 6))
        glue = [rng.choice(["", " ", " ", " "]) for _ in tokens]
        messages.append("".join(g + t for g, t in zip(glue, tokens, strict=True)).strip())
    return messages


def full_detection(message: str) -> list[dict]:
    """find_tasks as it was before the pre-check: every clause through the matchers."""
    if len(message) > detect.MAX_MESSAGE or detect._CODE.search(message.lower()):
        return []
    return detect._tasks(detect.normalize(message))


@pytest.mark.parametrize(
    "messages",
    [MATH, ROUTER, CONTEXT, EDGES, _random_messages(4000)],
    ids=["math", "router", "context", "edges", "random"],
)
def test_the_pre_check_never_hides_a_task(messages):
    for message in messages:
        found = full_detection(message)
        if found:
            assert detect.may_ask(detect.normalize(message)), (message, found)
        assert detect.find_tasks(message) == found, message


def test_the_edge_cases_are_tasks_the_pre_check_had_to_let_through():
    # The reasoning above is exercised, not just allowed: most of these are tasks.
    assert sum(bool(full_detection(m)) for m in EDGES) >= 25
    assert all(detect.may_ask(detect.normalize(m)) for m in EDGES if full_detection(m))


def test_plain_chat_is_ruled_out_before_the_clauses():
    for message in ["hello there", "hola, ¿qué tal?", "Write a haiku about the sea.", "who wrote Hamlet?"]:
        assert not detect.may_ask(detect.normalize(message)), message
    chat = [m for m in ROUTER if not detect.may_ask(detect.normalize(m))]
    assert len(chat) * 2 >= len(ROUTER)  # most of the router's everyday messages skip the work


def test_normalize_takes_ascii_the_short_way_to_the_same_text():
    def the_long_way(text: str) -> str:
        text = text.lower()
        for symbol, replacement in detect._SYMBOLS:
            text = text.replace(symbol, replacement)
        return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))

    ascii_text = "".join(map(chr, range(128)))
    for text in [ascii_text, "What's $5 + $3?", "KELVIN \u212a", *MATH, *ROUTER, *EDGES]:
        assert detect.normalize(text) == the_long_way(text), text
