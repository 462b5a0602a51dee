"""Runs in the sympy worker process only (worker.py): a task (plain data) in, the verified text out.

Sympy objects are built node by node from the parsed tree, never from text, and every power,
factorial and binomial is checked for size before sympy computes it: sympy evaluates
Integer(2)**Integer(10**9) eagerly, and no timeout in this process could interrupt that C loop
(the pool's kill can; these checks make that the rare case).
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext
from fractions import Fraction

import sympy

MAX_RESULT_DIGITS = 1000
MAX_FACTORIAL = 450  # 450! has 1001 digits
MAX_SHOWN_DIGITS = 40


class Refused(ValueError):
    """The task is outside the bounds, or has no finite answer; nothing is added."""


_FUNCTIONS = {
    "sqrt": sympy.sqrt,
    "cbrt": lambda a: sympy.real_root(a, 3),
    "sin": sympy.sin,
    "cos": sympy.cos,
    "tan": sympy.tan,
    "exp": sympy.exp,
    "log": sympy.log,
    "abs": sympy.Abs,
}


def _digits(value: sympy.Rational) -> float:
    return max(math.log10(abs(int(value.p)) or 1), math.log10(int(value.q)))


def _power(base, exponent):
    if exponent.is_Number and base.is_Number:
        if exponent.is_Rational and exponent.q > 3 or abs(exponent) > 10**5:
            raise Refused("exponent too large")
        if base.is_Rational and abs(exponent) * _digits(base) > MAX_RESULT_DIGITS:
            raise Refused("power too large")
    elif exponent.is_Number and abs(exponent) > 100:
        raise Refused("exponent too large")
    return sympy.Pow(base, exponent)


def _count(value, limit: int = MAX_FACTORIAL) -> int:
    if not (value.is_Integer and 0 <= value <= limit):
        raise Refused(f"needs a whole number from 0 to {limit}")
    return int(value)


def _combinatorial(name, n, k):
    n_int, k_int = _count(n, 10**4), _count(k, 10**4)
    if k_int > n_int:
        raise Refused("k larger than n")
    # log10 of C(n, k), from lgamma: refuse before computing a huge number
    size = (math.lgamma(n_int + 1) - math.lgamma(k_int + 1) - math.lgamma(n_int - k_int + 1)) / math.log(10)
    if name == "perm":
        size += math.lgamma(k_int + 1) / math.log(10)
    if size > MAX_RESULT_DIGITS:
        raise Refused("result too large")
    if name == "binomial":
        return sympy.Integer(math.comb(n_int, k_int))
    return sympy.Integer(math.perm(n_int, k_int))


def build(node):
    kind = node[0]
    if kind == "n":
        fraction = Fraction(node[1])  # the standard library's decimal parser: no sympy text parsing
        return sympy.Rational(fraction.numerator, fraction.denominator)
    if kind == "v":
        return sympy.Symbol(node[1], real=True)
    if kind == "c":
        return {"pi": sympy.pi, "e": sympy.E}[node[1]]
    if kind == "f":
        args = [build(arg) for arg in node[2:]]
        if node[1] in ("binomial", "perm"):
            return _combinatorial(node[1], *args)
        return _FUNCTIONS[node[1]](*args)
    if kind == "neg":
        return -build(node[1])
    if kind == "!":
        return sympy.factorial(_count(build(node[1])))
    if kind == "pct":
        return build(node[1]) / 100
    left, right = build(node[1]), build(node[2])
    if kind == "+":
        return left + right
    if kind == "-":
        return left - right
    if kind == "*":
        return left * right
    if kind == "/":
        if right == 0:
            raise Refused("division by zero")
        return left / right
    if kind == "mod":
        if right == 0:
            raise Refused("division by zero")
        return sympy.Mod(left, right)
    if kind == "^":
        return _power(left, right)
    raise Refused(f"unknown node {kind}")


def _plain(expr) -> str:
    return str(expr).replace("**", "^")


def number_text(value, as_fraction: bool = False) -> str:
    """12; 0.75; 7/12 ≈ 0.5833333333; sqrt(2) ≈ 1.414213562; big numbers in scientific form."""
    value = sympy.nsimplify(value) if value.is_Float else value
    if value.has(sympy.zoo, sympy.oo, -sympy.oo, sympy.nan) or not value.is_finite:
        raise Refused("not a finite number")
    if value.is_Integer:
        text = str(value)
        if len(text.lstrip("-")) > MAX_SHOWN_DIGITS:
            return f"{sympy.Float(value, 15)} (a number of {len(text.lstrip('-'))} digits)"
        return text
    if value.is_Rational:
        q = int(value.q)
        while q % 2 == 0:
            q //= 2
        while q % 5 == 0:
            q //= 5
        if q == 1 and len(str(value)) < 30:  # terminating decimal: exact
            with localcontext() as context:
                context.prec = 60
                decimal = format(Decimal(int(value.p)) / Decimal(int(value.q)), "f")
            decimal = decimal.rstrip("0").rstrip(".") if "." in decimal else decimal
            return f"{value} = {decimal}" if as_fraction else decimal
        return f"{value} ≈ {_approx(value)}"
    if value.is_real is False:
        raise Refused("not a real number")
    return f"{_plain(value)} ≈ {_approx(value)}"


def _approx(value) -> str:
    return format(float(sympy.N(value, 15)), ".10g")


def evaluate(tree, as_fraction: bool) -> str:
    value = sympy.simplify(build(tree))
    if value.free_symbols:
        raise Refused("not a number")
    return number_text(value, as_fraction)


def solve(equations) -> str:
    built = [sympy.Eq(build(left), build(right)) for left, right in equations]
    symbols = sorted(set().union(*(eq.free_symbols for eq in built if eq not in (True, False))), key=str)
    if not symbols:
        raise Refused("nothing to solve for")
    solutions = sympy.solve(built, symbols, dict=True)
    if not solutions:
        return "gives no solution"
    shown = []
    for solution in solutions[:4]:
        if not all(value.is_real is not False for value in solution.values()):
            continue
        pairs = [f"{s} = {_plain(solution[s])}" for s in symbols if s in solution]
        shown.append(", ".join(pairs))
    if not shown:
        return "gives no real solution"
    return "gives " + " or ".join(shown)


def differentiate(tree, variable: str, order: int) -> str:
    expr = build(tree)
    return _plain(sympy.diff(expr, sympy.Symbol(variable, real=True), order))  # as sympy gives it: expanded


def integrate(tree, variable: str, bounds) -> str:
    expr, symbol = build(tree), sympy.Symbol(variable, real=True)
    if bounds:
        low, high = build(bounds[0]), build(bounds[1])
        value = sympy.integrate(expr, (symbol, low, high))
        if value.has(sympy.Integral):
            raise Refused("no closed form")
        return number_text(sympy.simplify(value))
    value = sympy.integrate(expr, symbol)
    if value.has(sympy.Integral):
        raise Refused("no closed form")
    return _plain(value) + " + C"


def prime(n: int) -> str:
    if n < 2:
        return f"{n} is not prime (primes start at 2)"
    if sympy.isprime(n):  # fast at any size this grammar lets through (BPSW)
        return f"{n} is prime"
    small = sympy.factorint(n, limit=10**5)  # trial division and a little Pollard rho only
    if all(sympy.isprime(p) for p in small):
        return f"{n} is not prime: {n} = {_factors(n, small)}"
    divisors = [p for p in small if 1 < p < n]  # what is left unfactored may be n itself
    return f"{n} is not prime: it is divisible by {min(divisors)}" if divisors else f"{n} is not prime"


def _factors(n: int, found: dict | None = None) -> str:
    found = found or sympy.factorint(n)
    return " × ".join(f"{p}^{e}" if e > 1 else str(p) for p, e in sorted(found.items()))


def factor(tree) -> str:
    expr = build(tree)
    if expr.is_Integer:
        n = int(expr)
        if abs(n) < 2:
            raise Refused("nothing to factor")
        if sympy.isprime(abs(n)):
            return f"{n} is prime: it has no other factors"
        sign = "-" if n < 0 else ""
        return f"{n} = {sign}{_factors(abs(n))}"
    if not expr.free_symbols:
        raise Refused("not an integer or a polynomial")
    factored = sympy.factor(expr)
    return f"{_plain(expr)} = {_plain(factored)}"


def run(task: dict) -> str:
    op = task["op"]
    if op == "eval":
        return evaluate(task["tree"], task.get("fraction", False))
    if op == "solve":
        return solve(task["equations"])
    if op == "diff":
        return differentiate(task["tree"], task["variable"], task.get("order", 1))
    if op == "integrate":
        return integrate(task["tree"], task["variable"], task.get("bounds"))
    if op == "prime":
        return prime(int(task["n"]))
    if op == "factor":
        return factor(task["tree"])
    raise Refused(f"unknown op {op}")
