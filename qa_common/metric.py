"""The SQuAD v1.1 metric: exact match and token F1 (with precision and recall).

Normalisation follows the official evaluation script: lowercase, drop punctuation, drop the
articles a/an/the, collapse whitespace. Each prediction is scored against every gold answer and
the best score is kept, per metric.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def precision_recall_f1(prediction: str, gold: str) -> tuple[float, float, float]:
    """Token-overlap precision, recall and F1 of one prediction against one gold answer."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0, 0.0, 0.0
    precision, recall = shared / len(predicted), shared / len(expected)
    return precision, recall, 2 * precision * recall / (precision + recall)


def score_answer(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """Best exact match, F1, precision and recall of one prediction over its gold answers."""
    if not golds:
        raise ValueError("an answer needs at least one gold answer to be scored")
    prf = [precision_recall_f1(prediction, gold) for gold in golds]
    return {
        "exact_match": max(exact_match(prediction, gold) for gold in golds),
        "precision": max(p for p, _, _ in prf),
        "recall": max(r for _, r, _ in prf),
        "f1": max(f for _, _, f in prf),
    }


def squad_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict:
    """Corpus metrics in percent over every reference question, as the official script reports.

    ``predictions`` maps question ids to answer text, ``references`` question ids to gold answers.
    A question without a prediction scores 0 and is counted in ``missing``; a prediction for an
    unknown question id is an error.
    """
    unknown = sorted(set(predictions) - set(references))
    if unknown:
        shown = ", ".join(map(repr, unknown[:5])) + (" ..." if len(unknown) > 5 else "")
        raise ValueError(f"{len(unknown)} prediction id(s) are not in the data: {shown}")
    if not references:
        raise ValueError("no reference questions to score")
    totals = Counter()
    for question_id, golds in references.items():
        if question_id in predictions:
            totals.update(score_answer(predictions[question_id], golds))
    count = len(references)
    result = {name: 100.0 * totals[name] / count for name in ("exact_match", "f1", "precision", "recall")}
    result.update(total=count, missing=sum(1 for question_id in references if question_id not in predictions))
    return result
