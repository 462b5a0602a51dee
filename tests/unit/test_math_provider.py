"""The math provider over its labelled set (tests/data/math_cases.yaml), with a real sympy worker
pool: every expected fact is added, nothing is added where nothing is asked, and a pathological
task is given up (its worker killed and replaced) without stopping the next question."""

from __future__ import annotations

import asyncio
import pathlib
import re

import pytest
import yaml

from capibara_grpc.context import math as verified_math
from capibara_grpc.context.math import detect, grammar
from capibara_grpc.context.math.pool import SympyPool

CASES = yaml.safe_load((pathlib.Path(__file__).parents[1] / "data" / "math_cases.yaml").read_text())["cases"]
PACKAGE = pathlib.Path(verified_math.__file__).parent
ISSUE_CATEGORIES = {"percent", "power", "root", "fraction", "words", "equation", "derivative", "integral", "prime"}
ISSUE_CATEGORIES |= {"factor", "combinatorics", "pathological", "negative"}


@pytest.fixture(scope="module")
def pool():
    # The CPU bound is what stops runaway work, whatever the load; a generous wall clock and first
    # start keep a busy host from failing small tasks.
    pool = SympyPool(cpu_limit=1.0, wall_limit=30, startup_wait=60)
    yield pool
    pool.close()


def case_param(case):
    marks = [pytest.mark.xfail(strict=True, reason=case["limitation"])] if case.get("limitation") else []
    return pytest.param(case, id=case["message"][:60], marks=marks)


@pytest.mark.parametrize("case", [case_param(c) for c in CASES])
def test_labelled_message(pool, case):
    addition = verified_math.math_context(case["message"], pool)
    if case.get("nothing"):
        assert addition is None, addition.content
    else:
        assert addition is not None, "nothing added"
        assert addition.kind == "arithmetic" and addition.content.startswith("Verified: ")
        assert case["expect"] in addition.content, addition.content


def test_the_labelled_set_covers_the_issue():
    assert len(CASES) >= 80
    assert sum(c["lang"] == "es" for c in CASES) * 2 >= len(CASES)
    assert {c["category"] for c in CASES} >= ISSUE_CATEGORIES
    assert sum(bool(c.get("nothing")) for c in CASES) >= 30
    assert all(bool(c.get("nothing")) != ("expect" in c) for c in CASES)


def test_a_runaway_task_is_killed_and_the_next_question_answered(pool):
    semiprime = "295720860623744131884353542918956801025583845068242037678727"  # two 30-digit primes
    pool.wait_ready(60)
    before = {worker.process.pid for worker in pool._all}
    assert verified_math.math_context(f"factoriza {semiprime}", pool) is None
    after = {worker.process.pid for worker in pool._all}
    assert len(after) == pool.size and len(before - after) == 1  # the runaway one was replaced
    assert all(worker.process.poll() is None for worker in pool._all)
    assert verified_math.math_context("cuánto es 17 por 3", pool).content == "Verified: 17 * 3 = 51."


def test_the_async_form_gives_the_same_fact(pool):
    addition = asyncio.run(verified_math.math_context_async("doce por doce", pool))
    assert addition.content == "Verified: 12 * 12 = 144."
    assert asyncio.run(verified_math.math_context_async("tengo 3 gatos y 2 perros", pool)) is None


@pytest.mark.parametrize(
    "text",
    ["__import__('os').system('ls')", "open('x')", "[1, 2]", "a.b", "lambda: 1", "2 +", "x = 1", "1 2", "((1)"],
)
def test_the_grammar_refuses_anything_but_math(text):
    with pytest.raises(grammar.ParseError):
        grammar.parse(text)


@pytest.mark.parametrize(
    "text",
    ["9" * 61 + " + 1", "(" * 9 + "1" + ")" * 9, " + ".join(["1"] * 31), "1 + " * 60 + "1"],
)
def test_input_over_the_size_bounds_is_refused_before_any_work(text):
    with pytest.raises(grammar.ParseError):
        grammar.parse(text)


def test_no_text_reaches_eval_or_sympys_string_parsers():
    """sympify and parse_expr call eval on their input: user text must never reach them."""
    calls = re.compile(r"\b(?:eval|exec|sympify|parse_expr|S)\(|sympy\.parsing")
    offending = [p.name for p in PACKAGE.glob("*.py") if calls.search(p.read_text())]
    assert offending == []


def test_a_message_that_looks_like_code_gets_nothing():
    assert detect.find_tasks("```python\nprint(2 + 2)\n```") == []
    assert detect.find_tasks("if (a == 3) { b = 2 * 4; }") == []
