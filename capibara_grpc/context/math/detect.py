"""Which parts of a message ask for a computation, as tasks for the sympy worker (plain dicts).

Precision over recall: a clause (a sentence, or the text around a '?') is a question only when
ALL of it is the question, after a leading cue ("cuánto es", "what's", "calcula") and trailing
courtesy ("por favor", "thanks") are taken off. "I have 3 kids and 2 dogs", "la versión 2.0 salió
en 2019", "call me at 555-1234" or "the 80/20 rule" have words the grammar does not know, so
nothing is added; a message that looks like code is skipped whole.
"""

from __future__ import annotations

import re
import unicodedata

from capibara_grpc.context.math import categories, words
from capibara_grpc.context.math.grammar import CONSTANTS, ParseError, has_operation, parse, render, variables

MAX_MESSAGE = 1000  # characters; longer messages get nothing (a person's calculation is short)
MAX_TASKS = 3

_SYMBOLS = [
    ("²", "^2"), ("³", "^3"), ("×", "*"), ("·", "*"), ("÷", "/"), ("−", "-"), ("–", "-"),
    ("√", " sqrt "), ("∫", " integral "), ("’", "'"), ("⁄", "/"), ("$", ""), ("€", ""), ("£", ""),
]  # fmt: skip
_CODE = re.compile(
    r"```|\bdef |\breturn\b|\bimport |print\(|console\.|==|\+=|-=|=>|[{}\[\]]|&&|\|\||#include|"
    r"\b(?:var|let|const|int|float|for|while|if) *\(|\bfor \w+ in\b|\bx *= *\d+ *;"
)
_CLAUSES = re.compile(r"[?¿¡\n]+|(?<![\d)])!|\.(?=\s|$)|:(?=\s)")
_LEADING = re.compile(
    r"^(?:hey|hi|hello|ok(?:ay)?|so|please|pls|quick question|(?:can|could|would) you(?: please)?"
    r"(?: help me)?(?: tell me| calculate| compute| work out| figure out| find| give me)?|(?:tell|show) me"
    r"|do you know|i (?:need|want) to know|i need|help me(?: with)?|calculate|compute|evaluate|work out"
    r"|figure out|find|give me|what(?: ?'s| is| s|s)|what are|how much (?:is|are|does|do)|(?:the )?(?:value|result|answer)"
    r" (?:of|to)|simplify|reduce|the fraction|the expression|the number"
    r"|hola|oye|oiga|buenas|por favor|porfa|(?:me )?(?:puedes|podrias|puede|podria) (?:decirme|decir|calcular(?:me)?"
    r"|ayudarme a calcular)|me dices|dime|sabes|quiero saber|necesito saber|necesito|ayudame (?:a calcular|con)"
    r"|cuant[oa]s? (?:es|son|da|vale|seria|sale|hace|dan)|calcula(?:r|me)?|calcule|evalua|halla(?:r)?|encuentra"
    r"|cual es|cuales son|que es|(?:el |la )?(?:valor|resultado) de|simplifica(?:r)?|la fraccion|la expresion"
    r"|el numero)\b[\s,]*"
)
_TRAILING = re.compile(
    r"(?:[\s,]*(?:por favor|porfa|please|pls|thanks|thank you|gracias|exactly|exactamente|exacto|=|equals"
    r"|es igual a|is equal to))+\s*$"
)


def normalize(text: str) -> str:
    text = text.lower()
    if text.isascii():  # the same, quicker: "$" is the one ASCII symbol, and ASCII has no accents
        return text.replace("$", "")
    for symbol, replacement in _SYMBOLS:
        text = text.replace(symbol, replacement)
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return text


def clauses(message: str) -> list[tuple[str, bool]]:
    """Each clause, cue and courtesy removed, and whether a cue ("cuánto es", "what's") was there."""
    return _clauses(normalize(message))


def _clauses(text: str) -> list[tuple[str, bool]]:
    found = []
    for part in _CLAUSES.split(text):
        part = " ".join(part.split()).strip(" ,")
        if not part:
            continue
        part = words.FRACTION_WORDS.apply(part)
        part = words.numbers_to_digits(" ".join(part.split()))
        cued = False
        while True:
            without_cue = _LEADING.sub("", part)
            cued = cued or without_cue != part
            shorter = _TRAILING.sub("", without_cue).strip(" ,")
            shorter = re.sub(r"^what (.+) (?:is|are|equals|makes)$", r"\1", shorter)  # "tell me what 2+2 is"
            if shorter == part:
                break
            part = shorter
        if part:
            found.append((part, cued))
    return found


_DECIMAL_COMMA = words.Rules([(r"(?<=\d),(?=\d{3}(?!\d))", ""), (r"(?<=\d),(?=\d)", ".")])
# A separator before exactly three digits: 1,250 is 1250 in English; 1.250 is 1.25. In Spanish
# both are either, by country (Spain writes 1.250 for 1250 and 1,25 for 1.25; Mexico the English
# way), so a Spanish message decides only 2.000 or 1,000,000 (groups of zeros: thousands, as nobody
# writes 2,000 for 2); anything else, or a message in neither language, is left alone.
_THOUSANDS = re.compile(r"(?<![\d.,])\d{1,3}(?:[.,]\d{3})+(?![\d.,])")
_SPANISH = re.compile(r"\b(?:cuanto|cuanta|calcula|el|la|los|las|de|del|es|son|por|mas|menos|entre|y)\b")
_ENGLISH = re.compile(r"\b(?:what|whats|of|is|are|how|plus|minus|times|and|the)\b")
# "9/11", "24/7", "50/50", "3-2" alone are names, dates or scores as often as sums: computed
# only when asked ("cuánto es 9/11").
_BARE_PAIR = re.compile(r"\d+[/-]\d+")
_FRACTION = re.compile(r"(?<![\d.^/])(\d+) ?/ ?(\d+)(?![\d./]| ?\^)")
_NOT_ARITHMETIC = re.compile(
    r"\b\d{1,2}/\d{1,2}/\d{2,4}\b|\b\d{4}-\d{1,2}-\d{1,2}\b|\b\d{1,2}-\d{1,2}-\d{2,4}\b|^\+?\d{3}-\d{4}$"
    r"|^\d{2,4}(?:-\d{2,4}){2,}$|^(?:19|20)\d\d-(?:19|20)?\d\d$|\b\d{1,2}:\d\d\b"
)


# -- the pre-check: most messages ask for no computation, and cannot -----------------------------
# Every task needs, in the normalized message: a digit (percentages, primes, combinatorics and
# arithmetic on numbers all match digits), a word the clauses turn into digits (number words,
# "half", "squared", "twice", ordinals), the constant pi or e (arithmetic without digits, "sqrt
# pi"), "=" (equations), or the word of a kind that works on variables (factor, derivative,
# integral). Variables alone are not enough: arithmetic refuses them. The clauses only cut text
# at word boundaries, except the trailing courtesy, which can be glued on ("dosgracias" is
# "dos"): a word counts before one too. tests/unit/test_math_precheck.py holds it to find_tasks.
_DIGIT_WORDS = {
    *words.NUMBER_WORDS, *words.ORDINALS, *CONSTANTS, "half", "mitad", "tercio", "third", "cuarto",
    "quarter", "tercera", "cuarta", "cuadrado", "segunda", "squared", "cubo", "cubed", "doble", "double",
    "twice", "triple", "thrice",
}  # fmt: skip
_KIND_WORDS = ("factor", "descompo", "deriv", "differen", "diferen", "d/d", "integr", "primitiva")
_COURTESY_START = "por|please|pls|thank|gracias|exact|equals|es igual|is equal"


def _alternation(options) -> str:
    """The words as one regular expression, a trie by their letters: a search over a message tries
    one branch per letter instead of every word in turn."""
    branches: dict[str, list[str]] = {}
    for option in options:
        if option:
            branches.setdefault(option[0], []).append(option[1:])
    body = "|".join(re.escape(first) + _alternation(rest) for first, rest in sorted(branches.items()))
    if not body:
        return ""
    body = f"(?:{body})" if len(branches) > 1 else body
    return f"(?:{body})?" if "" in options else body


_MAY_ASK = re.compile(
    rf"[\d=]|{'|'.join(re.escape(w) for w in _KIND_WORDS)}"
    rf"|\b{_alternation(_DIGIT_WORDS)}(?:\b|(?={_COURTESY_START}))"
)


def may_ask(text: str) -> bool:
    """False when the normalized message cannot hold a task: find_tasks then skips the clauses."""
    return _MAY_ASK.search(text) is not None


def _meaningful(tree) -> bool:
    """An operation on numbers, not a lone number ('-5', '5%')."""
    return has_operation(tree) and not (tree[0] in ("neg", "pct") and tree[1][0] == "n")


def arithmetic(clause: str, cued: bool = True) -> dict | None:
    if _NOT_ARITHMETIC.search(clause) or (not cued and _BARE_PAIR.fullmatch(clause)):
        return None
    text = clause
    text = words.VERB_FORMS.apply(text)
    text = re.sub(r"^(\d+ ?/ ?\d+) (?:of|de|del) ", r"(\1) * ", text)  # "3/4 of 200"
    # A typed fraction is one number: "7/8 entre 1/4" is (7/8) / (1/4), not 7/8/1/4.
    text = _FRACTION.sub(r"(\1/\2)", text)
    text = words.rewrite(text, words.OPERATOR_WORDS)
    try:
        tree = parse(text)
    except ParseError:
        return None
    if not _meaningful(tree) or variables(tree):
        return None
    return {"op": "eval", "label": render(tree), "tree": tree, "fraction": "/" in text}


def task_for(clause: str, cued: bool = True) -> dict | None:
    special = categories.combinatorics_call(clause)
    if special:
        return special
    clause = words.rewrite(clause, _DECIMAL_COMMA)
    for matcher in categories.MATCHERS:
        task = matcher(clause)
        if task is not None:
            return task or None  # {} means "a category of its own, but not valid math": nothing
    return arithmetic(clause, cued)


def _grouped_numbers(clause: str, spanish, english) -> str | None:
    """The clause with 1,250 / 2.000 read as the language says, or None when it cannot say."""
    numbers = _THOUSANDS.findall(clause)
    if bool(spanish) == bool(english):
        return None
    if spanish:
        if not all(set(re.split(r"[.,]", n)[1:]) == {"000"} for n in numbers):
            return None
        return _THOUSANDS.sub(lambda m: re.sub(r"[.,]", "", m.group(0)), clause)
    if any(n.count(".") > 1 or ("." in n and "," in n) for n in numbers):
        return None
    return _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), clause)


def find_tasks(message: str) -> list[dict]:
    if len(message) > MAX_MESSAGE:
        return []
    text = normalize(message)
    if not may_ask(text) or _CODE.search(message.lower()):  # the pre-check first: it is the cheaper
        return []
    return _tasks(text)


def _tasks(text: str) -> list[dict]:
    """find_tasks after its checks: every clause of the normalized message through the matchers."""
    tasks = []
    for clause, cued in _clauses(text):
        if _THOUSANDS.search(clause):
            clause = _grouped_numbers(clause, _SPANISH.search(text), _ENGLISH.search(text))
            if clause is None:
                continue
        task = task_for(clause, cued)
        if task and task not in tasks:
            tasks.append(task)
    return tasks[:MAX_TASKS]
