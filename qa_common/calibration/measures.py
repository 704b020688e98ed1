"""How well scores are calibrated, and how many questions they let one answer at a given precision."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BINS = 10  # equal-width confidence bins of the expected calibration error and the reliability diagram


def reliability(confidences: Sequence[float], outcomes: Sequence[bool], bins: int = BINS) -> list[dict]:
    """Per equal-width confidence bin: ``{"low", "high", "count", "confidence", "accuracy"}`` (means)."""
    confidences, outcomes = np.asarray(confidences, dtype=np.float64), np.asarray(outcomes, dtype=np.float64)
    index = np.minimum((confidences * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        mine = index == b
        rows.append({"low": b / bins, "high": (b + 1) / bins, "count": int(mine.sum()),
                     "confidence": float(confidences[mine].mean()) if mine.any() else None,
                     "accuracy": float(outcomes[mine].mean()) if mine.any() else None})
    return rows


def expected_calibration_error(confidences: Sequence[float], outcomes: Sequence[bool], bins: int = BINS) -> float:
    """The count-weighted mean of |accuracy - confidence| over equal-width bins (0 is perfectly calibrated)."""
    rows, total = reliability(confidences, outcomes, bins), len(confidences)
    return float(sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"]) / total)


def answered_at_precision(scores: Sequence[float], correct: Sequence[bool], precision: float) -> float:
    """Selective answering: the largest share of the questions that can be answered, highest score
    first, with at least ``precision`` of those answers right (0.0 when not even the first is)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    right = np.cumsum(np.asarray(correct, dtype=np.float64)[order])
    met = np.flatnonzero(right / np.arange(1, len(order) + 1) >= precision)
    return float((met[-1] + 1) / len(order)) if len(met) else 0.0


def risk_coverage_area(scores: Sequence[float], correct: Sequence[bool]) -> float:
    """The area under the risk-coverage curve (Geifman & El-Yaniv, 2017): the error rate of the answers
    kept, highest score first, averaged over every coverage from one answer to all of them. Lower is a
    ranking that puts right answers first; it does not depend on what the scores' values say."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    wrong = np.cumsum(1.0 - np.asarray(correct, dtype=np.float64)[order])
    return float(np.mean(wrong / np.arange(1, len(order) + 1))) if len(order) else 0.0
