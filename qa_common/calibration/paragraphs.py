"""The one-paragraph fit: isotonic score map and Platt scaling of the no-answer probability on a
validation split of questions each read with its own paragraph."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from qa_common.calibration.measures import expected_calibration_error
from qa_common.config import QAConfig
from qa_common.decoding import NULL_SPAN, Candidates, _logit, _sigmoid, no_answer_probability, rank_candidates
from qa_common.metric import normalize_answer

MIN_SCORE_QUESTIONS = 200  # fewer: an isotonic map would follow the noise of a few questions


def uncalibrated(config: QAConfig) -> QAConfig:
    """``config`` without calibration, its no-answer threshold carried back to the raw scale (the
    same abstentions)."""
    t = config.no_answer_threshold
    if 0 < t < 1:
        t = _sigmoid((_logit(t) - config.no_answer_bias) / config.no_answer_scale)
    return config.replace(score_calibration=(), no_answer_scale=1.0, no_answer_bias=0.0, no_answer_threshold=t)


def top_answer_correct(candidates: Candidates, context: str, golds: Sequence[str]) -> bool:
    """Whether the top candidate is exactly right: the null answer (or no span) for a question without
    gold answers, else a span equal to a gold answer after SQuAD normalisation."""
    span = candidates.spans[0] if candidates.spans else NULL_SPAN
    if span == NULL_SPAN:
        return not golds
    return normalize_answer(context[span[0] : span[1]]) in {normalize_answer(gold) for gold in golds}


def fit_score_map(scores: Sequence[float], correct: Sequence[bool]) -> tuple[tuple[float, float], ...]:
    """Knots of the isotonic regression of ``correct`` on ``scores`` (top answers' softmax scores),
    from 0 to 1; ``()`` (uncalibrated) for fewer than :data:`MIN_SCORE_QUESTIONS` questions."""
    from sklearn.isotonic import IsotonicRegression

    if len(scores) < MIN_SCORE_QUESTIONS:
        return ()
    regression = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
    regression.fit(np.asarray(scores, dtype=np.float64), np.asarray(correct, dtype=np.float64))
    xs, ys = regression.X_thresholds_.tolist(), regression.y_thresholds_.tolist()
    if xs[0] > 0:
        xs, ys = [0.0, *xs], [ys[0], *ys]
    if xs[-1] < 1:
        xs, ys = [*xs, 1.0], [*ys, ys[-1]]
    return tuple(zip(xs, ys))


def fit_no_answer_scaling(differences: Sequence[float], unanswerable: Sequence[bool]) -> tuple[float, float]:
    """``(a, b)`` of ``sigmoid(a * difference + b)`` by logistic regression (a > 0, so the ranking of
    questions by no-answer probability is kept); ``(1, 0)`` unless both kinds of question occur.

    The targets are Platt's (1999): ``(n+ + 1) / (n+ + 2)`` for unanswerable questions and
    ``1 / (n- + 2)`` for answerable ones instead of 1 and 0, so that a small validation set that
    happens to separate the two kinds does not drive the fit to infinite confidence.
    """
    from scipy.optimize import minimize

    x, y = np.asarray(differences, dtype=np.float64), np.asarray(unanswerable, dtype=bool)
    keep = np.isfinite(x)
    x, y = x[keep], y[keep]
    positives, negatives = int(y.sum()), int((~y).sum())
    if not positives or not negatives:
        return 1.0, 0.0
    target = np.where(y, (positives + 1) / (positives + 2), 1 / (negatives + 2))

    def loss(params: np.ndarray) -> float:
        z = math.exp(params[0]) * x + params[1]
        return float(np.mean(target * np.logaddexp(0.0, -z) + (1 - target) * np.logaddexp(0.0, z)))

    fitted = minimize(loss, np.zeros(2), method="L-BFGS-B", bounds=[(-7.0, 5.0), (-50.0, 50.0)])
    return float(math.exp(fitted.x[0])), float(fitted.x[1])


def calibrated_threshold(raw: QAConfig, calibrated: QAConfig, raw_candidates: Sequence[Candidates]) -> float:
    """``raw``'s no-answer threshold on ``calibrated``'s scale, so that every decision stays the same.

    Training's threshold is the raw no-answer probability of one validation question (the official
    ``find_best_thresh``), a question that sits exactly on the boundary: its calibrated probability,
    computed as decoding computes it, is the threshold (a round trip through the formula could move
    that question across). Otherwise the threshold goes through the same monotone map.
    """
    t = raw.no_answer_threshold
    if not 0 < t < 1:
        return t
    for c in raw_candidates:
        if c.no_answer_probability == t:
            return no_answer_probability(c.null_score, c.best_span_score, calibrated)
    return _sigmoid(calibrated.no_answer_scale * _logit(t) + calibrated.no_answer_bias)


def score_outcomes(all_candidates: Sequence[Candidates], contexts: Sequence[str], golds: Sequence[Sequence[str]],
                   config: QAConfig) -> tuple[list[float], list[bool]]:
    """The top answer's score under ``config``'s calibration, and whether it is exactly right, per question."""
    scores = [float(c.scores(config)[0]) if c.spans else 0.0 for c in all_candidates]
    correct = [top_answer_correct(c, context, g) for c, context, g in zip(all_candidates, contexts, golds)]
    return scores, correct


def fit(logits: Sequence[tuple], contexts: Sequence[str], golds: Sequence[Sequence[str]],
        config: QAConfig) -> tuple[QAConfig, dict]:
    """``(calibrated config, report)`` from each question's ``(start_logits, end_logits, offsets)``.

    The report holds the fitted values and, on these questions, the expected calibration error of
    the score and of the no-answer probability before and after.
    """
    raw = uncalibrated(config)
    raw_candidates = [rank_candidates(start, end, offsets, raw) for start, end, offsets in logits]
    unanswerable = [not g for g in golds]
    scale, bias = fit_no_answer_scaling([c.null_score - c.best_span_score for c in raw_candidates], unanswerable)
    no_answer = raw.replace(no_answer_scale=scale, no_answer_bias=bias)
    no_answer = no_answer.replace(no_answer_threshold=calibrated_threshold(raw, no_answer, raw_candidates))
    threshold = no_answer.no_answer_threshold
    candidates = [rank_candidates(start, end, offsets, no_answer) for start, end, offsets in logits]
    softmax, correct = score_outcomes(candidates, contexts, golds, no_answer)
    calibrated = no_answer.replace(score_calibration=fit_score_map(softmax, correct))
    before, _ = score_outcomes(raw_candidates, contexts, golds, raw)
    after, _ = score_outcomes(candidates, contexts, golds, calibrated)
    report = {
        "questions": len(logits), "unanswerable": sum(unanswerable),
        "score_knots": len(calibrated.score_calibration), "no_answer_scale": scale, "no_answer_bias": bias,
        "no_answer_threshold": threshold,
        "score_ece_before": expected_calibration_error(before, correct),
        "score_ece_after": expected_calibration_error(after, correct),
    }
    if 0 < sum(unanswerable) < len(unanswerable):
        report["no_answer_ece_before"] = expected_calibration_error(
            [c.no_answer_probability for c in raw_candidates], unanswerable)
        report["no_answer_ece_after"] = expected_calibration_error(
            [c.no_answer_probability for c in candidates], unanswerable)
    return calibrated, report


def calibrate(runner, tokenizer, records: Sequence[dict], config: QAConfig) -> tuple[QAConfig, dict]:
    """:func:`fit` on SQuAD-format ``records``, answered with ``runner`` (any backend)."""
    from qa_common.inference import Question, question_logits

    questions = [Question(r["question"], r["context"]) for r in records]
    logits = [(start, end, offsets) for start, end, offsets, _ in
              question_logits(runner, tokenizer, questions, config)]
    return fit(logits, [r["context"] for r in records], [r["answers"]["text"] for r in records], config)


def describe(report: dict) -> str:
    if "score_map" in report:  # over passages, where the score and its map were chosen
        mapped = f"through the {report['score_map']} map" if report["score_knots"] else "unmapped"
        text = (f"score: the {report['answer_confidence']}, {mapped}, expected calibration error "
                f"{report['score_ece_before']:.3f} -> {report['score_ece_after']:.3f}")
        if report["selective_cross_fitted"]:
            text += " (answered at 80 % precision on held-out articles: " + ", ".join(
                f"{name} {figures['answered_at_80']:.1%}" for name, figures in report["selective_cross_fitted"].items()) + ")"
    elif report["score_knots"]:
        text = (f"score: isotonic map of {report['score_knots']} knots, expected calibration error "
                f"{report['score_ece_before']:.3f} -> {report['score_ece_after']:.3f}")
    else:
        text = (f"score: left uncalibrated (fewer than {MIN_SCORE_QUESTIONS} questions), expected calibration "
                f"error {report['score_ece_before']:.3f}")
    if "no_answer_ece_before" in report:
        text += (f"; no-answer probability sigmoid({report['no_answer_scale']:.3f} * d + {report['no_answer_bias']:.3f}): "
                 f"{report['no_answer_ece_before']:.3f} -> {report['no_answer_ece_after']:.3f}")
    if "passage_rank_weight" in report:
        by_weight = report["f1_by_passage_rank_weight"]
        text += (f"; the search's order weighs {report['passage_rank_weight']} (F1 {by_weight['0.0']:.2f} ignoring it, "
                 f"{by_weight[str(report['passage_rank_weight'])]:.2f} at that weight)")
    return text + f" (on the {report['questions']} questions it was fitted on)"
