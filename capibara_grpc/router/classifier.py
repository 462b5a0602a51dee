"""Route classifier fitted on the routes file's examples. Pure Python and scikit-learn, no gRPC.

Three signals, stacked:
- meaning: logistic regression on sentence embeddings (all-MiniLM-L6-v2 by default);
- spelling: logistic regression on character n-grams of accent-free lowercase text, which copes
  with typos, missing accents and Spanish words the English encoder knows poorly;
- keywords: hits of each route's keywords, and whether the text holds an arithmetic expression.
A second logistic regression, fitted on out-of-fold outputs of the first two, weighs them and
gives calibrated probabilities. The fallback threshold is fitted on out-of-fold decisions too.

Fast path: encoding a sentence costs ~15 ms of CPU here, the spelling model well under 1 ms. A
spelling+keywords-only combiner decides on its own when it is sure enough, with a confidence
bar fitted on out-of-fold decisions so that it is no less accurate than the full stack; only the
other queries are encoded.

Scoring is plain numpy over the fitted weights (LinearScorer, SparseText): scikit-learn's
transform and predict_proba validate their input and build sparse matrices on every call, which
cost more than the arithmetic for the few short texts of one batch (profiled under load). The
results are the same; tests/unit/test_router_classifier.py checks them against scikit-learn.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from capibara_grpc.text import normalize

DEFAULT = "default"
# "2+2", "7 por 8", "15% of 80", "x^2 - 4", "3/8": numbers joined by an operator.
_ARITHMETIC = re.compile(
    r"\d\s*(?:[-+*/^x×÷%=]|por|entre|mas|menos|times|plus|minus|divided by|of|de)\s*[\d(x]", re.IGNORECASE
)


class LinearScorer:
    """A fitted LogisticRegression's predict_proba on dense rows, as numpy arithmetic."""

    def __init__(self, model: LogisticRegression):
        self.weights = np.ascontiguousarray(model.coef_.T)
        self.intercept = model.intercept_.copy()

    def proba(self, logits: np.ndarray) -> np.ndarray:
        """Class probabilities from decision values (rows: texts), as scikit-learn computes them."""
        logits = logits + self.intercept
        if logits.shape[1] == 1:  # two classes: one logistic
            positive = 1.0 / (1.0 + np.exp(-logits[:, 0]))
            return np.column_stack([1.0 - positive, positive])
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        return self.proba(rows @ self.weights)


class SparseText:
    """A fitted TfidfVectorizer's transform (sublinear tf, l2 norm) of a batch of texts, times a
    weight matrix, without building a sparse matrix: each text's few columns are gathered, and
    the arithmetic is a handful of numpy calls for the whole batch, not per text."""

    def __init__(self, vectorizer: TfidfVectorizer, weights: np.ndarray):
        self.analyze = vectorizer.build_analyzer()
        self.vocabulary = vectorizer.vocabulary_
        self.idf = vectorizer.idf_
        self.weights = np.ascontiguousarray(weights)  # features x classes

    def logits(self, texts: list[str]) -> np.ndarray:
        """texts x classes."""
        rows, columns, counts = [], [], []
        lookup = self.vocabulary.get
        for row, text in enumerate(texts):
            terms = self.analyze(text)
            found = Counter(map(lookup, terms, itertools.repeat(-1, len(terms))))  # -1: not in the vocabulary
            found.pop(-1, None)
            rows += [row] * len(found)
            columns += found.keys()
            counts += found.values()
        logits = np.zeros((len(texts), self.weights.shape[1]))
        if not columns:
            return logits
        rows, columns = np.array(rows), np.array(columns)
        values = (1.0 + np.log(np.array(counts, dtype=float))) * self.idf[columns]
        values /= np.sqrt(np.bincount(rows, values * values, minlength=len(texts)))[rows]
        # rows ascend: sum each text's contributions by slicing (np.add.at is far slower)
        present, starts = np.unique(rows, return_index=True)
        logits[present] = np.add.reduceat(values[:, None] * self.weights[columns], starts, axis=0)
        return logits


@dataclass
class Scores:
    proba: np.ndarray  # texts x labels
    unsure: np.ndarray  # indices of the texts the fast path is not sure about
    lexical: np.ndarray
    keywords: np.ndarray


@dataclass
class FitReport:
    threshold: float
    oof_accuracy: float
    examples: int
    fast_threshold: float
    fast_share: float  # out-of-fold share of examples the fast path decides


class RouteClassifier:
    def __init__(self, keywords: dict[str, list[str]], route_models: dict[str, str], default_model: str):
        self.keywords = {label: [normalize(k) for k in words if normalize(k)] for label, words in keywords.items()}
        self.route_models = {**route_models, DEFAULT: default_model}
        self.labels: list[str] = []
        self.threshold = 0.0
        self.fast_threshold = 1.01

    # -- features ----------------------------------------------------------------------------

    def keyword_hits(self, text: str, label: str) -> int:
        padded = f" {normalize(text)} "
        return sum(f" {word} " in padded for word in self.keywords.get(label, ()))

    def _index_keywords(self) -> None:
        """keyword -> the label columns it counts for (once per listing), and the most words in a
        keyword: a text's keywords are then looked up by its word n-grams, not searched for one by
        one (the same hits as keyword_hits: both texts are normalized, single-spaced)."""
        self._keyword_columns: dict[str, list[int]] = {}
        for column, label in enumerate(self.labels):
            for word in self.keywords.get(label, ()):
                self._keyword_columns.setdefault(word, []).append(column)
        self._keyword_words = max((len(k.split()) for k in self._keyword_columns), default=0)

    def _keyword_hits(self, texts: list[str], normalized: list[str] | None = None) -> np.ndarray:
        """texts x (labels + 1): keyword hits per label (keyword_hits), then 2 for arithmetic; at most 2."""
        normalized = normalized or [normalize(t) for t in texts]
        hits = np.zeros((len(texts), len(self.labels) + 1))
        for row, (text, plain) in enumerate(zip(texts, normalized, strict=True)):
            words = plain.split()
            grams = {
                " ".join(words[start : start + n])
                for n in range(1, self._keyword_words + 1)
                for start in range(len(words) - n + 1)
            }
            for gram in grams:  # a keyword counts once however often it occurs, as in keyword_hits
                for column in self._keyword_columns.get(gram, ()):
                    hits[row, column] += 1
            hits[row, -1] = 2.0 if _ARITHMETIC.search(text.lower()) else 0.0
        return np.minimum(hits, 2.0)

    def has_evidence(self, text: str, label: str) -> bool:
        """Explicit signs of `label` in the text itself: its keywords (or, for math, arithmetic)."""
        return self.keyword_hits(text, label) > 0 or (label == "math" and bool(_ARITHMETIC.search(text.lower())))

    def _lexical(self, texts: list[str]):
        normalized = [normalize(t) for t in texts]
        return sparse.hstack([self._chars.transform(normalized), self._words.transform(normalized)]).tocsr()

    def _stack(self, lexical_proba, meaning_proba, keyword_hits) -> np.ndarray:
        return np.hstack([np.log(lexical_proba + 1e-6), np.log(meaning_proba + 1e-6), keyword_hits])

    # -- fitting -----------------------------------------------------------------------------

    def fit(
        self, texts: list[str], labels: list[str], embeddings: np.ndarray, threshold: float | None = None
    ) -> FitReport:
        self.labels = sorted(set(labels))
        self._index_keywords()
        y = np.array([self.labels.index(label) for label in labels])
        normalized = [normalize(t) for t in texts]
        self._chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True).fit(normalized)
        self._words = TfidfVectorizer(
            analyzer="word", ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"[\w+#]+"
        ).fit(normalized)
        lexical = self._lexical(texts)
        self._lexical_model = LogisticRegression(C=20.0, max_iter=5000)
        self._meaning_model = LogisticRegression(C=20.0, max_iter=5000)
        folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
        lexical_oof = cross_val_predict(self._lexical_model, lexical, y, cv=folds, method="predict_proba")
        meaning_oof = cross_val_predict(self._meaning_model, embeddings, y, cv=folds, method="predict_proba")
        self._lexical_model.fit(lexical, y)
        self._meaning_model.fit(embeddings, y)
        stacked = self._stack(lexical_oof, meaning_oof, self._keyword_hits(texts))
        self._combiner = LogisticRegression(C=1.0, max_iter=5000)
        combined_oof = cross_val_predict(self._combiner, stacked, y, cv=folds, method="predict_proba")
        self._combiner.fit(stacked, y)
        self.threshold = self._fit_threshold(combined_oof, y) if threshold is None else threshold
        accuracy = float(np.mean(combined_oof.argmax(axis=1) == y))

        spelled = self._spelled(lexical_oof, self._keyword_hits(texts))
        self._fast_combiner = LogisticRegression(C=1.0, max_iter=5000)
        fast_oof = cross_val_predict(self._fast_combiner, spelled, y, cv=folds, method="predict_proba")
        self._fast_combiner.fit(spelled, y)
        self.fast_threshold = self._fit_fast_threshold(fast_oof, combined_oof, y)
        self._prepare_scoring()
        fast_share = float(np.mean(fast_oof.max(axis=1) >= self.fast_threshold))
        return FitReport(self.threshold, accuracy, len(texts), self.fast_threshold, fast_share)

    def _prepare_scoring(self) -> None:
        lexical = LinearScorer(self._lexical_model)
        chars = len(self._chars.vocabulary_)
        self._lexical_scorer = lexical
        self._char_logits = SparseText(self._chars, lexical.weights[:chars])
        self._word_logits = SparseText(self._words, lexical.weights[chars:])
        self._meaning_scorer = LinearScorer(self._meaning_model)
        self._combiner_scorer = LinearScorer(self._combiner)
        self._fast_scorer = LinearScorer(self._fast_combiner)

    def _spelled(self, lexical_proba, keyword_hits) -> np.ndarray:
        return np.hstack([np.log(lexical_proba + 1e-6), keyword_hits])

    @staticmethod
    def _fit_fast_threshold(fast: np.ndarray, full: np.ndarray, y: np.ndarray) -> float:
        """Lowest confidence at which the fast path is right at least 98% of the time and no less
        often than the full stack on the same examples (1.01 = never take the fast path)."""
        confidence = fast.max(axis=1)
        for threshold in np.arange(0.80, 1.0, 0.01):
            taken = confidence >= threshold
            if taken.sum() < 5:
                break
            fast_right = np.mean(fast[taken].argmax(axis=1) == y[taken])
            full_right = np.mean(full[taken].argmax(axis=1) == y[taken])
            if fast_right >= max(0.98, full_right):
                return round(float(threshold), 2)
        return 1.01

    def _fit_threshold(self, proba: np.ndarray, y: np.ndarray) -> float:
        """The threshold that makes the most right model choices on out-of-fold decisions; a
        fallback is right when the default model is the one the true route would have used."""
        default_model = self.route_models[DEFAULT]
        true_models = [self.route_models[self.labels[i]] for i in y]
        predicted_models = [self.route_models[self.labels[i]] for i in proba.argmax(axis=1)]
        confidence = proba.max(axis=1)
        best, best_score = 0.0, -1.0
        for threshold in np.arange(0.0, 0.61, 0.02):
            chosen = [default_model if c < threshold else m for c, m in zip(confidence, predicted_models, strict=True)]
            score = np.mean([c == t for c, t in zip(chosen, true_models, strict=True)])
            if score > best_score + 1e-9:
                best, best_score = float(threshold), score
        return round(best, 2)

    # -- prediction --------------------------------------------------------------------------

    def predict_proba(self, texts: list[str], encode) -> np.ndarray:
        """Probabilities per label for each text; `encode(texts) -> embeddings` is only called
        for the texts the fast path is not sure about."""
        scores = self.fast_scores(texts)
        if len(scores.unsure):
            self.add_meaning(scores, encode([texts[i] for i in scores.unsure]))
        return scores.proba

    def fast_scores(self, texts: list[str]) -> Scores:
        """Spelling and keywords only (well under a millisecond a text): probabilities, and which
        texts the fast path is not sure about (`unsure`: they need `add_meaning`)."""
        normalized = [normalize(t) for t in texts]
        lexical = self._lexical_scorer.proba(
            self._char_logits.logits(normalized) + self._word_logits.logits(normalized)
        )
        keywords = self._keyword_hits(texts, normalized)
        proba = self._fast_scorer.predict_proba(self._spelled(lexical, keywords))
        return Scores(proba, np.flatnonzero(proba.max(axis=1) < self.fast_threshold), lexical, keywords)

    def add_meaning(self, scores: Scores, embeddings) -> None:
        """The unsure texts' probabilities from the full stack, given their embeddings (in order)."""
        unsure = scores.unsure
        meaning = self._meaning_scorer.predict_proba(np.asarray(embeddings, dtype=float))
        stacked = self._stack(scores.lexical[unsure], meaning, scores.keywords[unsure])
        scores.proba[unsure] = self._combiner_scorer.predict_proba(stacked)
