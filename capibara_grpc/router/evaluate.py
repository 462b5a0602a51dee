"""Router evaluation on a labelled set it has never seen: accuracy per route, overall accuracy,
confusion matrix and calibration.

    .venv/bin/capibara router-eval [--set tests/data/router_eval.yaml]
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import pathlib
from dataclasses import dataclass

import numpy as np
import yaml

from capibara_grpc.config import REPO_ROOT, MeshConfig, load_routes
from capibara_grpc.router.classifier import DEFAULT
from capibara_grpc.router.core import Router
from capibara_grpc.sentence_encoder import SentenceEncoder
from capibara_grpc.text import normalize

DEFAULT_SET = REPO_ROOT / "tests" / "data" / "router_eval.yaml"
CALIBRATION_BINS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0001)


@dataclass
class Outcome:
    text: str
    lang: str
    expected: str
    route: str
    confidence: float
    fallback: bool
    expected_model: str
    model: str

    @property
    def right(self) -> bool:
        return self.route == self.expected


@dataclass
class Evaluation:
    outcomes: list[Outcome]
    threshold: float
    labels: list[str]

    def accuracy(self, outcomes=None) -> float:
        outcomes = self.outcomes if outcomes is None else outcomes
        return sum(o.right for o in outcomes) / len(outcomes) if outcomes else float("nan")

    @property
    def model_accuracy(self) -> float:
        return sum(o.model == o.expected_model for o in self.outcomes) / len(self.outcomes)

    def accuracy_at(self, confidence: float) -> tuple[float, int]:
        confident = [o for o in self.outcomes if o.confidence >= confidence]
        return self.accuracy(confident), len(confident)

    def calibration(self) -> list[tuple[float, float, int, float, float]]:
        """(low, high, count, mean confidence, accuracy) per confidence bin; a decision counts
        as right when its top route (before any fallback) is the expected one."""
        rows = []
        for low, high in itertools.pairwise(CALIBRATION_BINS):
            inside = [o for o in self.outcomes if low <= o.confidence < high]
            if inside:
                rows.append(
                    (
                        low,
                        min(high, 1.0),
                        len(inside),
                        float(np.mean([o.confidence for o in inside])),
                        self.accuracy(inside),
                    )
                )
        return rows

    def report(self) -> str:
        lines = [f"{len(self.outcomes)} queries, fallback threshold {self.threshold:.2f}"]
        lines.append(f"overall route accuracy: {self.accuracy():.3f}   model accuracy: {self.model_accuracy:.3f}")
        for lang in sorted({o.lang for o in self.outcomes}):
            subset = [o for o in self.outcomes if o.lang == lang]
            lines.append(f"  {lang}: {self.accuracy(subset):.3f} on {len(subset)}")
        at, count = self.accuracy_at(0.8)
        lines.append(f"decisions at confidence >= 0.80: {count} ({count / len(self.outcomes):.0%}), right {at:.3f}")
        lines.append(f"fallbacks to the default route: {sum(o.fallback for o in self.outcomes)}")
        lines.append("\nper route:")
        for label in self.labels:
            subset = [o for o in self.outcomes if o.expected == label]
            if subset:
                lines.append(
                    f"  {label:17} {self.accuracy(subset):.3f}  ({sum(o.right for o in subset)}/{len(subset)})"
                )
        names = [label for label in self.labels] + ([DEFAULT] if DEFAULT not in self.labels else [])
        short = {n: n[:6] for n in names}
        lines.append("\nconfusion (rows: expected, columns: decided):")
        lines.append(" " * 18 + " ".join(f"{short[n]:>6}" for n in names))
        counts = collections.Counter((o.expected, o.route) for o in self.outcomes)
        for expected in self.labels:
            if expected == DEFAULT:
                continue
            lines.append(f"  {expected:16}" + " ".join(f"{counts[(expected, n)]:6d}" for n in names))
        lines.append("\ncalibration (confidence bin: count, mean confidence, accuracy):")
        for low, high, count, mean, accuracy in self.calibration():
            lines.append(f"  [{low:.1f}, {high:.1f}): {count:4d}  {mean:.3f}  {accuracy:.3f}")
        wrong = [o for o in self.outcomes if not o.right]
        lines.append(f"\nwrong ({len(wrong)}):")
        for o in wrong:
            lines.append(f"  {o.expected:>16} -> {o.route:16} {o.confidence:.2f}  {o.text[:70]}")
        return "\n".join(lines)


def load_set(path: pathlib.Path = DEFAULT_SET) -> list[dict]:
    return yaml.safe_load(path.read_text())["queries"]


async def evaluate(router: Router, queries: list[dict]) -> Evaluation:
    outcomes = []
    for query in queries:
        decision = await router.route(query["text"])
        outcomes.append(
            Outcome(
                text=query["text"],
                lang=query.get("lang", "?"),
                expected=query["route"],
                route=decision.route_name if not decision.fallback else DEFAULT,
                confidence=decision.confidence,
                fallback=decision.fallback,
                expected_model=router.model_of(query["route"]),
                model=decision.model_id,
            )
        )
    return Evaluation(outcomes, router.classifier.threshold, router.classifier.labels)


def leaked_examples(router: Router, queries: list[dict]) -> list[str]:
    """Evaluation queries that are also route examples (after normalization): must be none."""
    examples = {normalize(t) for t in router.training_set()[0]}
    return [q["text"] for q in queries if normalize(q["text"]) in examples]


def build_router(config: MeshConfig, encoder: SentenceEncoder | None = None) -> Router:
    encoder = encoder or SentenceEncoder(config.router.encoder, config.router.cache_size)
    router = Router(config, load_routes(config), encoder.encode)
    router.fit()
    return router


def main(config: MeshConfig, set_path: str | None) -> int:
    queries = load_set(pathlib.Path(set_path) if set_path else DEFAULT_SET)
    router = build_router(config)
    leaked = leaked_examples(router, queries)
    if leaked:
        print(f"warning: {len(leaked)} evaluation queries are also route examples: {leaked[:5]}")
    print(asyncio.run(evaluate(router, queries)).report())
    return 0
