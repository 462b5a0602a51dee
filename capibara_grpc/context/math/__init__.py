"""Verified math for the context service: what a message asks to compute (percentages, powers and
roots, fractions, numbers in words, equations and small systems, derivatives and integrals,
primes and factors, combinations and permutations), computed by sympy and added as a fact the
model can copy ("Verified: 15% of 80 = 12.").

detect.py decides, in this process and without sympy, whether a message asks for a computation
and parses it (grammar.py, no eval); the computation runs in a worker process under a hard time
limit (pool.py), so a pathological expression adds nothing instead of hanging the service.
"""

from __future__ import annotations

import asyncio

from capibara_grpc.context.addition import Addition
from capibara_grpc.context.math.detect import find_tasks
from capibara_grpc.context.math.pool import SympyPool

KIND = "arithmetic"  # the kind clients already see for computed facts
REASON = "the message asks for a computation: computed exactly by sympy instead of left to the model"
POOL = SympyPool()


def statement(task: dict, answer: str) -> str:
    op = task["op"]
    if op == "eval":
        if task.get("unit"):  # "12 as a percentage of 80" -> "12 is 15% of 80"
            part, whole = task["label"].split(" as a percentage of ")
            return f"{part} is {answer}{task['unit']} of {whole}"
        note = f" ({task['note']})" if task.get("note") else ""
        if answer.startswith(task["label"] + " "):  # 9/11 is already exact: "9/11 ≈ 0.8181818182"
            return f"{answer}{note}"
        return f"{task['label']} = {answer}{note}"
    if op in ("prime", "factor"):
        return answer
    if op == "solve":
        return f"{task['label']} {answer}"
    return f"{task['label']} is {answer}"


def facts(tasks: list[dict], pool: SympyPool | None = None) -> list[str]:
    pool = pool or POOL
    found = []
    for task in tasks:
        work = {k: v for k, v in task.items() if k not in ("label", "note", "unit")}
        answer = pool.run(work)
        if answer and "text" in answer:
            found.append(statement(task, answer["text"]))
    return found


def addition(found: list[str]) -> Addition | None:
    if not found:
        return None
    return Addition(KIND, "Verified: " + "; ".join(found) + ".", REASON)


def math_context(message: str, pool: SympyPool | None = None) -> Addition | None:
    return addition(facts(find_tasks(message), pool))


async def math_context_async(message: str, pool: SympyPool | None = None) -> Addition | None:
    """The same, with the (blocking, bounded) wait for the worker off the event loop. The first call,
    whatever the message, starts a worker, so the first question does not wait for sympy's import."""
    (pool or POOL).warm_up()
    tasks = find_tasks(message)  # no sympy here: well under a millisecond for most messages
    if not tasks:
        return None
    return addition(await asyncio.to_thread(facts, tasks, pool))
