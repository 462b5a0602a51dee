"""Spanish and English math in words, rewritten to symbols: "doce por doce" -> "12 * 12",
"twice 17" -> "2 * 17", "raíz cuadrada de 1764" -> "sqrt 1764", "2 elevado a 10" -> "2 ^ 10".

Text is already lowercase without accents (detect.normalize).
"""

from __future__ import annotations

import re

_UNITS = {
    # Spanish
    "cero": 0, "uno": 1, "dos": 2, "tres": 3, "cuatro": 4, "cinco": 5, "seis": 6, "siete": 7,
    "ocho": 8, "nueve": 9, "diez": 10, "once": 11, "doce": 12, "trece": 13, "catorce": 14,
    "quince": 15, "dieciseis": 16, "diecisiete": 17, "dieciocho": 18, "diecinueve": 19,
    "veinte": 20, "veintiuno": 21, "veintiun": 21, "veintidos": 22, "veintitres": 23,
    "veinticuatro": 24, "veinticinco": 25, "veintiseis": 26, "veintisiete": 27, "veintiocho": 28,
    "veintinueve": 29, "treinta": 30, "cuarenta": 40, "cincuenta": 50, "sesenta": 60,
    "setenta": 70, "ochenta": 80, "noventa": 90, "cien": 100, "ciento": 100, "doscientos": 200,
    "doscientas": 200, "trescientos": 300, "trescientas": 300, "cuatrocientos": 400,
    "cuatrocientas": 400, "quinientos": 500, "quinientas": 500, "seiscientos": 600,
    "seiscientas": 600, "setecientos": 700, "setecientas": 700, "ochocientos": 800,
    "ochocientas": 800, "novecientos": 900, "novecientas": 900,
    # English
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60,
    "seventy": 70, "eighty": 80, "ninety": 90,
}  # fmt: skip
_SCALES = {"hundred": 100, "mil": 1000, "thousand": 1000, "millon": 10**6, "millones": 10**6, "million": 10**6}
_JOINERS = {"y", "and"}
NUMBER_WORDS = frozenset([*_UNITS, *_SCALES])  # every word numbers_to_digits reads
_WORD = "|".join(sorted([*_UNITS, *_SCALES], key=len, reverse=True))
# "un"/"una"/"a" count only before a scale ("un millón", "a hundred"): elsewhere they are articles.
_NUMBER_WORDS = re.compile(
    rf"\b(?:(?:un|a)\s+(?=(?:hundred|thousand|million|millon|mil)\b))?(?:{_WORD})(?:[\s-]+(?:(?:y|and)\s+)?(?:{_WORD}))*\b"
)


def _value(words: list[str]) -> int | None:
    """The number, or None for a sequence that is not one number ("dos tres")."""
    total, current, last = 0, 0, None
    for word in words:
        if word in ("un", "a"):
            current = 1
        elif word in _UNITS:
            value = _UNITS[word]
            if last == "unit" and not (value < 10 and current % 10 == 0 and current % 100 >= 20):
                if not (current % 100 == 0 and current and value < 100):
                    return None
            current += value
        elif word == "hundred":
            current = (current or 1) * 100
        elif word in _SCALES:
            total += (current or 1) * _SCALES[word]
            current = 0
        last = "unit" if word in _UNITS else "scale"
    return total + current


def numbers_to_digits(text: str) -> str:
    def replace(match: re.Match) -> str:
        words = [w for w in re.split(r"[\s-]+", match.group(0)) if w not in _JOINERS]
        value = _value(words)
        if value is not None:
            return str(value)
        # Not one number ("tres y cuatro", "dos tres"): each word on its own.
        return re.sub(rf"\b(?:{_WORD})\b", lambda w: str(_value([w.group(0)])), match.group(0))

    return _NUMBER_WORDS.sub(replace, text)


# Before number words: phrases that would lose their meaning once "un"/"a" became numbers.
class Rules(list):
    """(pattern, replacement) rules, applied in order by `apply`. Each pattern is compiled once
    (re.sub(text_pattern, ...) looks it up in re's cache on every call, dozens of times per
    message), and one search for any of them (`guard`) comes first: most text matches none, and
    then costs one search instead of one per rule. Exact: when no pattern matches the text, no
    rule changes it, so none matches after either."""

    def __init__(self, rules):
        super().__init__((re.compile(p) if isinstance(p, str) else p, r) for p, r in rules)
        self.guard = re.compile("|".join(f"(?:{pattern.pattern})" for pattern, _ in self))

    def apply(self, text: str) -> str:
        if self.guard.search(text) is None:
            return text
        for pattern, replacement in self:
            text = pattern.sub(replacement, text)
        return text


FRACTION_WORDS = Rules(
    [
        (r"\bpor ?ciento\b|\bper ?cent\b", "%"),  # before "ciento" becomes 100
        (r"\b(?:la|the)?\s*mitad de\b|\bhalf of\b|\bhalf\b", " 1/2 * "),
        (r"\b(?:un|a|one) (?:tercio|third) (?:de|of)\b|\bla tercera parte de\b", " 1/3 * "),
        (r"\b(?:un|a|one) (?:cuarto|quarter) (?:de|of)\b|\bla cuarta parte de\b", " 1/4 * "),
    ]
)

ORDINALS = {
    "segunda": 2, "tercera": 3, "cuarta": 4, "quinta": 5, "sexta": 6, "septima": 7, "octava": 8,
    "novena": 9, "decima": 10, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6,
    "seventh": 7, "eighth": 8, "ninth": 9, "tenth": 10,
}  # fmt: skip
TIMES_X = r"(?<=\d) ?x ?(?=\d)"  # "3 x 4"; only where no variable is expected
# After number words, on text that holds digits.
OPERATOR_WORDS = Rules(
    [
        (r"\bpor ?ciento\b|\bper ?cent\b", "%"),
        (r"\b(?:(?:elevad[oa] )?al|to the) (?:cuadrado|segunda)\b|\bsquared\b", " ^ 2 "),
        (r"\b(?:(?:elevad[oa] )?al|to the) (?:cubo|tercera)\b|\bcubed\b", " ^ 3 "),
        (
            r"\b(?:elevado|elevada) a(?: la(?: potencia)?)?\b|\b(?:raised )?to the power(?: of)?\b|\braised to(?: the)?\b",
            " ^ ",
        ),
        (rf"(?<=\d) (?:a la|to the) (?=\d|(?:{'|'.join(ORDINALS)})\b)", " ^ "),
        (r"\^\s*(\d+)(?:st|nd|rd|th|a)\b(?: power| potencia)?", r"^ \1"),
        (rf"\^\s*({'|'.join(ORDINALS)})\b(?: power| potencia)?", lambda m: f"^ {ORDINALS[m.group(1)]}"),
        (r"\b(?:la )?raiz cubica de\b|\b(?:the )?cube root of\b", " cbrt "),
        (r"\b(?:la )?raiz(?: cuadrada)? de\b|\b(?:the )?square root of\b|\bsqrt of\b", " sqrt "),
        (r"\bfactorial (?:de|of) (\d+)\b|\b(\d+) factorial\b", r"\1\2!"),
        (r"\b(?:el )?doble de\b|\b(?:the )?double of\b|\btwice\b|\bdouble\b", " 2 * "),
        (r"\b(?:el )?triple de\b|\b(?:the )?triple of\b|\bthrice\b|\btriple\b", " 3 * "),
        (r"\bmultiplicad[oa] por\b|\bmultiplied by\b|\bpor\b|\btimes\b", " * "),
        (TIMES_X, " * "),
        (r"\bdividid[oa] (?:por|entre)\b|\bdivided by\b|\bentre\b|\bover\b", " / "),
        (r"\bmas\b|\bplus\b", " + "),
        (r"\bmenos\b|\bminus\b", " - "),
        (r"\bmodulo\b", " mod "),
    ]
)
# Verb forms: "suma 3 y 4", "add 2/5 and 1/10", "the sum of 3 and 4", "subtract 4 from 10".
_N = r"(-?\d+(?:\.\d+)?(?: ?/ ?\d+)?)"
VERB_FORMS = Rules(
    [
        (
            rf"^(?:suma|sumar|add|(?:la |the )?suma de|(?:the )?sum of) {_N} (?:y|and|to|con|\+|mas|plus) {_N}$",
            r"(\1) + (\2)",
        ),
        (
            rf"^(?:multiplica|multiplicar|multiply|(?:el |the )?producto de|(?:the )?product of) {_N} (?:y|and|by|\*|con|por|times|x) {_N}$",
            r"(\1) * (\2)",
        ),
        (rf"^(?:divide|dividir) {_N} (?:by|/|y|entre|por) {_N}$", r"(\1) / (\2)"),
        (rf"^(?:resta|restar|subtract|take) {_N} (?:de|from|away from|a) {_N}$", r"(\2) - (\1)"),
        (rf"^(?:resta|restar) {_N} (?:menos|-) {_N}$", r"(\1) - (\2)"),
    ]
)


def rewrite(text: str, rules: Rules) -> str:
    return " ".join(rules.apply(text).split())
