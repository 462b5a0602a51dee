"""One matcher per kind of question, in Spanish and English. Each takes a whole clause (lowercase,
no accents, numbers in digits, leading cue removed) and answers a task, {} when the clause is of
its kind but not valid math (nothing is added), or None when the clause is not of its kind.
Every pattern is anchored at both ends: a clause that only contains such a phrase is not a question.
"""

from __future__ import annotations

import functools
import re

from capibara_grpc.context.math import words
from capibara_grpc.context.math.grammar import MAX_DIGITS, VARIABLES, ParseError, parse, render, variables

N = r"(-?\d+(?:\.\d+)?)"
W = r"(?: [a-z]+)?"  # one word: "80 euros", "10 libros"
# Word operators inside expressions with variables: "x" is a variable there, never "times".
_EXPRESSION_WORDS = words.Rules(rule for rule in words.OPERATOR_WORDS if rule[0].pattern != words.TIMES_X)


def _expression(text: str):
    return parse(words.rewrite(text, _EXPRESSION_WORDS))


def _n(text: str) -> list:
    return ["neg", ["n", text[1:]]] if text.startswith("-") else ["n", text]


def _full(pattern: str, clause: str):
    return _compiled(pattern).fullmatch(clause)


@functools.cache
def _compiled(pattern: str) -> re.Pattern:
    """The pattern compiled once: one dict lookup instead of re's cache (its key built anew) per call."""
    return re.compile(pattern)


# -- percentages ---------------------------------------------------------------------------------

_PERCENT = r"(?: ?%| ?por ?ciento| ?percent| ?per cent)"
_PCT_OF = rf"(?:el |the |un |a )?{N}{_PERCENT} (?:de|del|of|of the|de los|de las){W} {N}{W}"
_WHAT_PERCENT = r"(?:que|what) (?:porcentaje|percent|percentage|%|tanto por ciento)"
_PCT_IS = [
    (
        rf"{_WHAT_PERCENT} (?:es|is|representa|represents|de|of) {N}{W} (?:de|of|out of|sobre|respecto a){W} {N}{W}",
        1,
        2,
    ),
    (rf"{N}{W} (?:es|is|representa|represents) {_WHAT_PERCENT} (?:de|of){W} {N}{W}", 1, 2),
    (rf"{_WHAT_PERCENT} (?:de|of) {N}{W} (?:es|is|son|are) {N}{W}", 2, 1),
    (rf"{N} (?:de|out of|sobre|of) {N} (?:en|as a|as) (?:porcentaje|percentage|percent)", 1, 2),
]
_PCT_CHANGE = [
    (rf"(?:aumenta|aumentar|incrementa|incrementar|increase|sube|subir|raise) {N}{W} (?:en|by|un) (?:un |el )?{N}{_PERCENT}", 1),
    (rf"{N}{W} (?:\+|mas|plus) (?:el |un |a )?{N}{_PERCENT}", 1),
    (rf"(?:disminuye|disminuir|reduce|reducir|decrease|rebaja|rebajar|baja|bajar) {N}{W} (?:en|by|un) (?:un |el )?{N}{_PERCENT}", -1),
    (rf"{N}{W} (?:-|menos|minus) (?:el |un |a )?{N}{_PERCENT}", -1),
    (rf"{N}{W} (?:con|with) (?:un |a )?(?:descuento|discount) (?:del?|of) {N}{_PERCENT}", -1),
]  # fmt: skip


def percent(clause: str) -> dict | None:
    if match := _full(_PCT_OF, clause):
        share, whole = match.groups()
        tree = ["*", ["pct", _n(share)], _n(whole)]
        return {"op": "eval", "label": f"{share}% of {whole}", "tree": tree}
    for pattern, part_group, whole_group in _PCT_IS:
        if match := _full(pattern, clause):
            part, whole = match.group(part_group), match.group(whole_group)
            tree = ["*", ["/", _n(part), _n(whole)], ["n", "100"]]
            return {"op": "eval", "label": f"{part} as a percentage of {whole}", "tree": tree, "unit": "%"}
    for pattern, sign in _PCT_CHANGE:
        if match := _full(pattern, clause):
            base, rate = match.groups()
            tree = ["*", _n(base), ["+" if sign > 0 else "-", ["n", "1"], ["pct", _n(rate)]]]
            return {"op": "eval", "label": f"{base} {'+' if sign > 0 else '-'} {rate}%", "tree": tree}
    return None


# -- primes and factors --------------------------------------------------------------------------

_INT = r"(\d+)"
_PRIME = r"(?:primo|prime)(?: number| numero)?"
_PRIME_PATTERNS = [
    rf"(?:si |if |whether )?(?:is|es)(?: el| the)?(?: numero| number)? {_INT}(?: un| a)?(?: numero| number)? {_PRIME}",
    rf"(?:si |if |whether )?(?:el |the )?(?:numero |number )?{_INT} (?:es|is)(?: un| a)?(?: numero| number)? {_PRIME}",
    rf"(?:es primo|is prime)(?: el| the)?(?: numero| number)? {_INT}",
]
_FACTOR_PATTERNS = [
    r"(?:factoriza|factorizar|factorice|factorize|factorise|factor|descompon|descomponer|descompone)"
    r"(?: el numero| the number| la expresion| the expression| el polinomio| the polynomial)? (.+?)"
    r"(?: en factores(?: primos)?| en primos| into primes| into prime factors| in prime factors)?",
    r"(?:los |the )?(?:factores primos|prime factors|prime factori[sz]ation|factori[sz]ation|factorizacion(?: prima)?"
    r"|descomposicion(?: en factores primos| factorial| en primos)?)(?: de| of)(?: el numero| the number)? (.+)",
]


def prime(clause: str) -> dict | None:
    for pattern in _PRIME_PATTERNS:
        if match := _full(pattern, clause):
            n = match.group(1)
            return {"op": "prime", "n": n, "label": n} if len(n) <= MAX_DIGITS else {}
    return None


def factor(clause: str) -> dict | None:
    for pattern in _FACTOR_PATTERNS:
        if match := _full(pattern, clause):
            try:
                tree = _expression(match.group(1))
            except ParseError:
                return {}
            if not (tree[0] == "n" and "." not in tree[1]) and not variables(tree):
                return {}
            return {"op": "factor", "label": render(tree), "tree": tree}
    return None


# -- combinations and permutations ---------------------------------------------------------------


def _choice(kind: str, first: str, second: str | None, what: str) -> dict:
    if second is None:
        return {"op": "eval", "label": f"{first}!", "tree": ["!", ["n", first]], "note": f"ways to order {first}"}
    n, k = sorted([first, second], key=int, reverse=True)  # nobody chooses 10 of 3
    name, letter = ("binomial", "C") if kind == "choose" else ("perm", "P")
    note = f"ways to {what} {k} of {n}"
    return {"op": "eval", "label": f"{letter}({n}, {k})", "tree": ["f", name, ["n", n], ["n", k]], "note": note}


def combinatorics_call(clause: str) -> dict | None:
    """C(10,3) and P(10,3): matched before a decimal comma could turn '10,3' into 10.3."""
    if match := _full(r"(c|p|v|ncr|npr|binomial)\s*\(\s*(\d+)\s*[,;]\s*(\d+)\s*\)", clause):
        kind = "choose" if match.group(1) in ("c", "ncr", "binomial") else "order"
        return _choice(kind, match.group(2), match.group(3), "choose" if kind == "choose" else "arrange")
    return None


_CHOOSE_VERBS = r"(choose|pick|select|elegir|escoger|seleccionar|combine|combinar)"
_ORDER_VERBS = r"(arrange|order|permute|sit|seat|line up|ordenar|organizar|permutar|colocar|sentar|acomodar)"
_COMBINATORICS = [
    (rf"{_INT} (?:choose|sobre) {_INT}", "choose"),
    (r"(\d+)c(\d+)", "choose"),
    (r"(\d+)p(\d+)", "order"),
    (
        rf"(?:how many |cuantas )?(?:las |the )?(?:numero de |number of )?(?:combinaciones|combinations)(?: posibles| possible)? (?:de|of) {_INT}{W}"
        rf"(?: (?:tomad[oa]s|taken|elegid[oa]s|chosen))?(?: (?:de|en grupos de|in groups of|by|from|out of|de entre|entre))? {_INT}{W}"
        rf"(?: (?:en|a) \d+| at a time| a la vez)?(?: hay| are there)?",
        "choose",
    ),
    (
        rf"(?:las |the )?(?:numero de |number of )?(?:permutaciones|permutations|variaciones)(?: sin repeticion| posibles| possible)? "
        rf"(?:de|of) {_INT}{W}(?: (?:tomad[oa]s|taken)(?: de)? {_INT}(?: (?:en|a) \d+| at a time| a la vez)?)?",
        "order",
    ),
]
_HOW_MANY = [
    rf"how many (?:different |possible )?(?:ways|combinations|arrangements)(?: are there)?(?: (?:can you|can i|can we|to|could you|are there to))? "
    rf"(?P<verb>{_CHOOSE_VERBS}|{_ORDER_VERBS}) {_INT}{W}(?: (?:from|out of|of|among|from a group of|from a set of) {_INT}{W})?"
    r"(?: in a (?:line|row))?",
    rf"de cuantas (?:formas|maneras)(?: distintas| diferentes| posibles)?(?: se pueden| se puede| puedo| puedes| podemos| hay de| hay para)? "
    rf"(?P<verb>{_CHOOSE_VERBS}|{_ORDER_VERBS}) (?:a )?{_INT}{W}(?: (?:de|entre|de entre|de un grupo de) {_INT}{W})?"
    r"(?: en (?:una )?(?:fila|linea))?",
]  # fmt: skip


def combinatorics(clause: str) -> dict | None:
    for pattern, kind in _COMBINATORICS:
        if match := _full(pattern, clause):
            numbers = [g for g in match.groups() if g and g.isdigit()]
            return _choice(
                kind, numbers[0], numbers[1] if len(numbers) > 1 else None, "choose" if kind == "choose" else "arrange"
            )
    for pattern in _HOW_MANY:
        if match := _full(pattern, clause):
            verb = match.group("verb")
            numbers = [g for g in match.groups()[1:] if g and g.isdigit()]
            kind = "choose" if re.fullmatch(_CHOOSE_VERBS, verb) else "order"
            return _choice(kind, numbers[0], numbers[1] if len(numbers) > 1 else None, verb)
    return None


# -- calculus ------------------------------------------------------------------------------------

_FUNCTION_OF = r"(?: (?:la funcion|the function|f\(x\) ?=|y ?=))?"
_DERIVATIVE = [
    rf"(?:la |the )?(?:(segunda|second) )?(?:derivada|derivative|deriva|derivar|derive|differentiate|diferencia|diferenciar)"
    rf"(?: (?:de|of))?{_FUNCTION_OF} (?P<e>.+?)(?: (?:(?:con )?respecto a|with respect to|wrt|respect to|en funcion de) (?P<v>[xyzt]))?",
    r"()d/d(?P<v>[xyzt]) (?:of |de )?(?P<e>.+)",
]
_BOUND = r"(-?\d+(?:\.\d+)?|pi)"
_INTEGRAL_WORDS = r"(?:la |the )?(?:integral|integrate|integra|integrar|antiderivative|antiderivada|primitiva)"
_INTEGRAL = [
    rf"{_INTEGRAL_WORDS}(?: definida| definite)? (?:de|from|entre|between) {_BOUND} (?:a|to|hasta|y|and) {_BOUND} (?:de|of){_FUNCTION_OF} "
    rf"(?P<e>.+?)(?: d(?P<v>[xyzt]))?",
    rf"{_INTEGRAL_WORDS}(?: (?:definida|indefinida|definite|indefinite))?(?: (?:de|of))?{_FUNCTION_OF} (?P<e>.+?)(?: d(?P<v>[xyzt]))?"
    rf"(?: (?:from|de|entre|between) {_BOUND} (?:to|a|hasta|y|and) {_BOUND})?",
]  # fmt: skip


def _variable(tree, named: str | None) -> str | None:
    found = variables(tree)
    if named:
        return named
    if len(found) == 1:
        return found.pop()
    return "x" if "x" in found else None


def _function_of_variable(patterns: list[str], clause: str):
    """(match, expression tree, variable) of the first pattern the whole clause matches; {} when
    one matched but its expression does not parse or has no clear variable (the clause asked, but
    for nothing we can compute); None when none matched."""
    for pattern in patterns:
        if match := _full(pattern, clause):
            try:
                tree = _expression(match.group("e"))
            except ParseError:
                return {}
            variable = _variable(tree, match.group("v"))
            return (match, tree, variable) if variable is not None else {}
    return None


def derivative(clause: str) -> dict | None:
    found = _function_of_variable(_DERIVATIVE, clause)
    if not found:
        return found
    match, tree, variable = found
    order = 2 if match.group(1) else 1
    label = f"the {'second ' * (order == 2)}derivative of {render(tree)} with respect to {variable}"
    return {"op": "diff", "label": label, "tree": tree, "variable": variable, "order": order}


def integral(clause: str) -> dict | None:
    found = _function_of_variable(_INTEGRAL, clause)
    if not found:
        return found
    match, tree, variable = found
    bounds = [b for b in match.groups() if b and re.fullmatch(_BOUND, b)]
    task = {"op": "integrate", "tree": tree, "variable": variable, "bounds": None}
    task["label"] = f"the integral of {render(tree)} d{variable}"
    if len(bounds) == 2:
        task["bounds"] = [_expression(b) for b in bounds]
        task["label"] += f" from {bounds[0]} to {bounds[1]}"
    return task


# -- equations -----------------------------------------------------------------------------------

_SOLVE = re.compile(
    r"(?P<verb>(?:solve|resuelve|resolver|resuelva|despeja|despejar|solucion de|solution of|solve for [xyzt]"
    r"|despeja (?:la )?[xyzt](?: en)?|find [xyzt]|halla [xyzt]|encuentra [xyzt])(?: (?:la|el|the|this|esta|este))?"
    r"(?: (?:ecuacion|ecuaciones|sistema|equation|equations|system)(?: (?:de ecuaciones|of equations|lineal|linear))?)?"
    r"(?: (?:para|for) [xyzt])?:? )?(?P<for>[xyzt] (?:if|si|when|cuando|en|in|given|dado que|sabiendo que|such that|tal que) )?"
    r"(?P<eqs>.+)"
)


def _split_equations(text: str) -> list[str]:
    """'x + y = 10, x - y = 2' or '2x + y = 7 y x - y = 2': 'y' is a variable too, so a joiner
    word only ends an equation that already has its '='."""
    parts = []
    for chunk in re.split(r"\s*(?:,(?=\s)|;)\s*", text):
        current = ""
        for piece in re.split(r"(\s(?:y|and|e)\s)", chunk):
            joiner = re.fullmatch(r"\s(?:y|and|e)\s", piece)
            if joiner and current.count("=") == 1:
                parts.append(current.strip())
                current = ""
            else:
                current += piece
        parts.append(current.strip())
    return parts


def equations(clause: str) -> dict | None:
    if "=" not in clause:
        return None
    match = _SOLVE.fullmatch(clause)
    asked = bool(match.group("verb") or match.group("for"))
    parts = _split_equations(match.group("eqs"))
    if len(parts) > 3 or any(part.count("=") != 1 for part in parts):
        return {}
    try:
        sides = [[_expression(side) for side in part.split("=")] for part in parts]
    except ParseError:
        return {}
    found = set().union(*(variables(side) for pair in sides for side in pair))
    if not found or not found <= VARIABLES:
        return {}
    # Without "solve", "x = 5" or "y = 2x + 1" is a definition (or code), not a question.
    if not asked and any(pair[0][0] == "v" or pair[1][0] == "v" for pair in sides):
        return {}
    label = "solving " + ", ".join(f"{render(left)} = {render(right)}" for left, right in sides)
    return {"op": "solve", "label": label, "equations": sides}


MATCHERS = [prime, factor, combinatorics, derivative, integral, equations, percent]
