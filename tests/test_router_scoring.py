"""The router's numpy scoring gives scikit-learn's answers: same probabilities, same routes.

Fitted on the repository's routes file with stand-in embeddings (a hashed bag of words:
the sentence encoder is not what is under test, and loading it takes seconds)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from capibara_grpc.config import load_config, load_routes
from capibara_grpc.router import evaluate
from capibara_grpc.router.classifier import _ARITHMETIC, RouteClassifier
from capibara_grpc.router.core import Router


def stand_in_encode(texts: list[str]) -> np.ndarray:
    """A hashed bag of words, unit length: deterministic, and informative enough to fit fast."""
    rows = np.zeros((len(texts), 64), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().split():
            rows[row, hashlib.sha256(word.encode()).digest()[0] % 64] += 1.0
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-9)


@pytest.fixture(scope="module")
def classifier() -> RouteClassifier:
    config = load_config(check_files=False)
    router = Router(config, load_routes(config), stand_in_encode)
    router.fit()
    return router.classifier


def sklearn_proba(classifier: RouteClassifier, texts: list[str]) -> np.ndarray:
    """What predict_proba computed with scikit-learn's own transform and predict_proba."""
    keywords = np.array(
        [
            [classifier.keyword_hits(t, label) for label in classifier.labels]
            + [2.0 if _ARITHMETIC.search(t.lower()) else 0.0]
            for t in texts
        ]
    )
    keywords = np.minimum(keywords, 2.0)
    lexical = classifier._lexical_model.predict_proba(classifier._lexical(texts))
    proba = classifier._fast_combiner.predict_proba(classifier._spelled(lexical, keywords))
    unsure = np.flatnonzero(proba.max(axis=1) < classifier.fast_threshold)
    if len(unsure):
        meaning = classifier._meaning_model.predict_proba(stand_in_encode([texts[i] for i in unsure]))
        proba[unsure] = classifier._combiner.predict_proba(
            classifier._stack(lexical[unsure], meaning, keywords[unsure])
        )
    return proba


def test_numpy_scoring_matches_scikit_learn(classifier):
    texts = [q["text"] for q in evaluate.load_set()][:120]
    texts += ["", "zzzz qqqq", "¿Cuánto es 17 por 23?", "x" * 500]  # nothing known; arithmetic; long
    ours = classifier.predict_proba(texts, stand_in_encode)
    theirs = sklearn_proba(classifier, texts)
    assert ours.shape == theirs.shape == (len(texts), len(classifier.labels))
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert (ours.argmax(axis=1) == theirs.argmax(axis=1)).all()


def test_one_text_scores_as_in_a_batch(classifier):
    texts = [q["text"] for q in evaluate.load_set()][:20]
    batch = classifier.predict_proba(texts, stand_in_encode)
    for row, text in enumerate(texts):
        np.testing.assert_allclose(classifier.predict_proba([text], stand_in_encode)[0], batch[row], atol=1e-9)


def test_only_unsure_texts_are_encoded(classifier):
    encoded: list[str] = []

    def encode(texts):
        encoded.extend(texts)
        return stand_in_encode(texts)

    texts = [q["text"] for q in evaluate.load_set()][:60]
    classifier.predict_proba(texts, encode)
    # Some texts need their meaning, the fast path decides the others alone.
    assert encoded and len(encoded) < len(texts) and set(encoded) <= set(texts)


def test_keyword_hits_by_word_ngrams_match_the_plain_search(classifier):
    """_keyword_hits looks a text's keywords up by its word n-grams; keyword_hits searches for
    each keyword in the text. Same counts, every text of both evaluation sets and edge cases
    (a keyword repeated, multi-word keywords, punctuation, accents, nothing)."""
    texts = [q["text"] for q in evaluate.load_set()]
    texts += [q["text"] for q in evaluate.load_set(evaluate.DEFAULT_SET.with_name("router_holdout.yaml"))]
    multi_word = [k for words in classifier.keywords.values() for k in words if " " in k]
    texts += ["", "   ", "python python python", "¡PYTHON!, ¿Python?", "c++ y c# y python"]
    texts += [f"dime {k} y {k.upper()}" for k in multi_word[:20]]
    plain = np.array([[min(classifier.keyword_hits(t, label), 2) for label in classifier.labels] for t in texts])
    np.testing.assert_array_equal(classifier._keyword_hits(texts)[:, :-1], plain)
    assert plain.sum() > len(texts) / 4  # the texts do hit keywords: the comparison means something
