"""Precision and recall of the math provider over its labelled set (tests/data/math_cases.yaml),
overall, per language and per category, with the time each message took.

    .venv/bin/python benchmarks/math_context.py

A message counts as a true positive when a fact was added and it holds the expected text; a fact
added to a "nothing" message, or a fact without the expected text, is a false positive; a labelled
question with no correct fact is a false negative. Precision = TP / (TP + FP) (how often an added
fact is right and wanted), recall = TP / (TP + FN) (how many questions got their fact).
"set holdout", "holdout2" and "holdout3" are cases written after the provider was committed, in
three batches (see docs/context.md for their figures on their first run, before any fix).
A benchmark, not a test: it prints a table.
"""

from __future__ import annotations

import collections
import pathlib
import sys
import time

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from capibara_grpc.context import math as verified_math
from capibara_grpc.context.math.pool import SympyPool

CASES = ROOT / "tests" / "data" / "math_cases.yaml"


def outcome(case: dict, addition) -> str:
    """tp, fp, fn, tn or wrong (a fact without the expected text: both a false positive and a miss)."""
    if case.get("nothing"):
        return "fp" if addition else "tn"
    if addition is None:
        return "fn"
    return "tp" if case["expect"] in addition.content else "wrong"


def figures(counts: collections.Counter) -> str:
    tp, fp, fn = counts["tp"], counts["fp"] + counts["wrong"], counts["fn"] + counts["wrong"]
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    total = sum(counts.values())
    return f"{total:4d} {tp:4d} {fp:4d} {fn:4d} {counts['tn']:4d}  {precision:9.3f} {recall:6.3f}"


def main() -> None:
    cases = yaml.safe_load(CASES.read_text())["cases"]
    # The service's limits, but a first start that may take its time on a busy host.
    pool = SympyPool(startup_wait=60)
    pool.wait_ready(60)
    groups: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    slowest, answered = [], []
    for case in cases:
        started = time.perf_counter()
        result = outcome(case, verified_math.math_context(case["message"], pool))
        slowest.append((time.perf_counter() - started, case["message"]))
        if result == "tp":
            answered.append(slowest[-1][0])
        for group in ("all", f"set {case.get('set', 'dev')}", f"lang {case['lang']}", case["category"]):
            groups[group][result] += 1
        if result in ("fp", "fn", "wrong"):
            print(f"{result:5s} [{case['category']}] {case['message']}")
    print(f"\n{'':16s} msgs   tp   fp   fn   tn  precision recall")
    heads = ["all", "set dev", "set holdout", "set holdout2", "set holdout3", "lang en", "lang es"]
    for name in [*heads, *sorted(g for g in groups if g not in heads)]:
        print(f"{name:16s}{figures(groups[name])}")
    answered.sort()
    print(f"\ntime per message with a fact: median {answered[len(answered) // 2] * 1000:.1f} ms")
    slowest.sort(reverse=True)
    times = sorted(t for t, _ in slowest)
    print(
        f"time per message: median {times[len(times) // 2] * 1000:.1f} ms, max {times[-1]:.2f} s ({slowest[0][1][:50]})"
    )
    pool.close()


if __name__ == "__main__":
    main()
