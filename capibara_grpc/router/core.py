"""Router core: query (+ recent turns) -> route, model, calibrated confidence. No gRPC in here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import numpy as np

from capibara_grpc.chat.types import RouteDecision
from capibara_grpc.config import MeshConfig, RoutesFile
from capibara_grpc.errors import InvalidArgument
from capibara_grpc.router.batching import MicroBatcher
from capibara_grpc.router.classifier import DEFAULT, FitReport, RouteClassifier
from capibara_grpc.telemetry import spans
from capibara_grpc.text import normalize

log = logging.getLogger(__name__)

# A follow-up is short; its own meaning is weighed against the conversation's by its confidence.
FOLLOW_UP_MAX_WORDS = 5
FOLLOW_UP_MAX_CONFIDENCE = 0.8
# Words that open a message referring back to the previous one ("¿y en Java?", "another one",
# "otro más corto"): such a message leans on the conversation even when it sounds confident.
FOLLOW_UP_OPENERS = {
    "y",
    "e",
    "and",
    "otro",
    "otra",
    "otros",
    "otras",
    "another",
    "more",
    "mas",
    "again",
    "tambien",
    "also",
    "ahora",
    "now",
    "same",
    "igual",
    "pero",
    "but",
}

Encode = Callable[[list[str]], np.ndarray]


class Router:
    def __init__(
        self,
        config: MeshConfig,
        routes: RoutesFile,
        encode: Encode,
        is_healthy: Callable[[str], bool] = lambda model_id: True,
    ):
        self.config = config
        self.routes = routes
        self.encode = encode
        self.is_healthy = is_healthy
        self.batcher = MicroBatcher(self.predict_batch, config.router.batch_max, config.router.batch_wait_ms)
        self.classifier = RouteClassifier(
            keywords={name: route.keywords for name, route in routes.routes.items()},
            route_models={name: route.model for name, route in routes.routes.items()},
            default_model=routes.default.model,
        )
        self.report: FitReport | None = None

    def training_set(self) -> tuple[list[str], list[str]]:
        texts, labels = [], []
        for name, route in self.routes.routes.items():
            texts += route.examples
            labels += [name] * len(route.examples)
        texts += self.routes.default.examples
        labels += [DEFAULT] * len(self.routes.default.examples)
        return texts, labels

    def fit(self) -> FitReport:
        started = time.perf_counter()
        texts, labels = self.training_set()
        threshold = None if self.config.router.threshold == "auto" else float(self.config.router.threshold)
        self.report = self.classifier.fit(texts, labels, self.encode(texts), threshold=threshold)
        log.info(
            "router fitted on %d examples in %.1f s: %s",
            self.report.examples,
            time.perf_counter() - started,
            self.report,
        )
        return self.report

    async def predict_batch(self, texts: list[str]) -> np.ndarray:
        """Route probabilities for a batch of texts. The fast path runs here, on the event loop (a
        thread hop per batch cost more than its numpy work, and the GIL would serialize it
        anyway); only the texts it is unsure about are encoded, in a thread (torch releases the GIL)."""
        texts = [t[: self.config.router.max_query_chars] for t in texts]
        scores = self.classifier.fast_scores(texts)
        if len(scores.unsure):
            embeddings = await asyncio.to_thread(self.encode, [texts[i] for i in scores.unsure])
            self.classifier.add_meaning(scores, embeddings)
        return scores.proba

    async def close(self) -> None:
        await self.batcher.close()

    def model_of(self, label: str) -> str:
        return self.classifier.route_models[label]

    async def _proba(self, text: str) -> np.ndarray:
        return await self.batcher.submit(text)

    async def route(self, query: str, history: list[str] | None = None) -> RouteDecision:
        """The route and model for `query`, in a span of its own when traced (telemetry)."""
        with spans.span("route decision") as span:
            decision = await self._route(query, history)
            span.update(
                {
                    "capibara.route": decision.route_name,
                    "capibara.model_id": decision.model_id,
                    "capibara.route.confidence": decision.confidence,
                    "capibara.fallback": decision.fallback,
                    "capibara.route.history_turns": len(history or ()),
                }
            )
        return decision

    async def _route(self, query: str, history: list[str] | None) -> RouteDecision:
        if not query.strip():
            raise InvalidArgument("query must not be empty")
        labels = self.classifier.labels
        proba = await self._proba(query.strip())
        reasons = []
        recent = [turn for turn in (history or []) if turn.strip()][-2:]
        words = normalize(query).split()
        refers_back = (
            bool(words)
            and words[0] in FOLLOW_UP_OPENERS
            and not self.classifier.has_evidence(query, labels[int(proba.argmax())])
        )
        if recent and len(words) <= FOLLOW_UP_MAX_WORDS and (refers_back or proba.max() < FOLLOW_UP_MAX_CONFIDENCE):
            context = await self._proba(" ".join(recent))
            weight = float(proba.max()) * (0.3 if refers_back else 1.0)
            mixed = weight * proba + (1 - weight) * context
            if labels[int(mixed.argmax())] != labels[int(proba.argmax())]:
                reasons.append(f"short follow-up: kept the conversation's route '{labels[int(context.argmax())]}'")
            proba = mixed
        order = [int(i) for i in np.argsort(-proba)]
        scores = [(labels[i], self.model_of(labels[i]), float(proba[i])) for i in order]
        best = labels[order[0]]
        # Confidence is in a route: for noise that is low, however sure the noise verdict is.
        confidence = max(p for label, _, p in scores if label != DEFAULT)
        threshold = self.classifier.threshold
        fallback = best == DEFAULT or confidence < threshold
        if best == DEFAULT:
            reasons.append(f"no route fits (looks like noise; best route only {confidence:.2f}): default route")
        elif confidence < threshold:
            reasons.append(f"'{best}' at {confidence:.2f} is below the threshold {threshold:.2f}: default route")
        else:
            reasons.append(f"'{best}' with confidence {confidence:.2f}")
        route_name = DEFAULT if fallback else best
        model_id = self.model_of(route_name)
        if not self.is_healthy(model_id):
            for label, candidate, _ in scores:
                if candidate != model_id and self.is_healthy(candidate):
                    reasons.append(
                        f"model '{model_id}' is unavailable: next best healthy is '{label}' on '{candidate}'"
                    )
                    route_name, model_id = label, candidate
                    break
            else:
                reasons.append(f"model '{model_id}' is unavailable and no other model is healthy")
        return RouteDecision(model_id, route_name, confidence, fallback, "; ".join(reasons), scores)
