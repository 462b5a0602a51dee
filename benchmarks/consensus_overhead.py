"""Wall time of a 3-model consensus against the slowest single model: the cost of combining.

Starts its own mesh (three llama-servers on ports 28xxx) and, for the same prompt, times each
model alone (sequentially) and then a `vote` consensus of the three (run concurrently).

    .venv/bin/python benchmarks/consensus_overhead.py [--runs 10]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tests.support.mesh import launched_model, running_mesh

MODELS = ["gpt-oss-20b", "phi", "mixtral"]
PARAMS = {"max_tokens": 48, "temperature": 0}
PROMPT = "Explain in two sentences why the sky is blue."


def timed(mesh, path: str, body: dict) -> float:
    started = time.perf_counter()
    status, response, _ = mesh.request("POST", path, body)
    assert status == 200, response
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    models = {
        "gpt-oss-20b": launched_model(28080),
        "phi": launched_model(28081),
        "mixtral": launched_model(28082, protocol="openai"),
    }
    with tempfile.TemporaryDirectory() as tmp, running_mesh(pathlib.Path(tmp), 28000, models, router=False) as mesh:
        body = {"message": PROMPT, **PARAMS}
        timed(mesh, "/api/consensus", {"prompt": PROMPT, "models": MODELS, "params": PARAMS})  # warm up
        singles, consensus = {m: [] for m in MODELS}, {s: [] for s in ("STRATEGY_VOTE", "STRATEGY_FUSE")}
        for _ in range(args.runs):
            for model in MODELS:
                singles[model].append(timed(mesh, "/api/chat", {**body, "model": model}))
            for strategy in consensus:
                consensus[strategy].append(
                    timed(
                        mesh,
                        "/api/consensus",
                        {"prompt": PROMPT, "models": MODELS, "strategy": strategy, "params": PARAMS},
                    )
                )
    print(f"\n{PROMPT!r}, {PARAMS['max_tokens']} tokens, temperature 0, {args.runs} runs, {time.strftime('%Y-%m-%d')}")
    print(f"{'call':34} {'p50 ms':>8}")
    for model, values in singles.items():
        print(f"{'single model ' + model:34} {statistics.median(values):8.0f}")
    slowest = max(statistics.median(v) for v in singles.values())
    for strategy, values in consensus.items():
        p50 = statistics.median(values)
        print(
            f"{'consensus ' + strategy.lower():34} {p50:8.0f}   ({p50 - slowest:+.0f} ms vs the slowest single model)"
        )


if __name__ == "__main__":
    main()
