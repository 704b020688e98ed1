"""Calibrated scores: an answer scored 0.8 should be right about 8 times in 10.

Two calibrators, fitted on a validation split and stored in the model's ``qa_config.json``
(:class:`qa_common.QAConfig`), so every place that decodes answers applies them:

- **score** (the answer's softmax probability among the question's candidates): isotonic
  regression (Zadrozny & Elkan, 2002) of whether the top answer is exactly right (the null answer
  is right when the question has no answer) on its softmax score, stored as the knots of a
  non-decreasing piecewise-linear map (``score_calibration``). Non-decreasing, so the ranking,
  and with it every answer, is unchanged. One temperature could not do it: this model family is
  under-confident at every score (accuracy above confidence in every bin), which a temperature
  cannot lift at both ends; on SQuAD dev the isotonic map reached an expected calibration error of
  0.017-0.024 on held-out articles where a temperature reached 0.051 (ACCURACY.md). It needs some
  hundreds of questions (:data:`MIN_SCORE_QUESTIONS`); with fewer the score stays uncalibrated.
- **no_answer_probability**: Platt scaling, ``sigmoid(a * (null_score - best_span_score) + b)``,
  fitted by logistic regression on whether the question is unanswerable; it needs validation data
  holding both kinds of question (otherwise a = 1, b = 0). The no-answer threshold is carried into
  the calibrated scale, so the model abstains on exactly the same questions as before.

A question asked of a library is read over its top retrieved passages at once, where distractor
passages and "the library does not hold it" change both the score and the null score: its
threshold and calibrators are fitted apart, in that setting (``passages_calibration``,
:func:`calibrate_passages`, on questions mined from a library by ``python -m library_job mine``),
and decoding over passages uses them (:meth:`qa_common.QAConfig.over_passages`).

``python -m qa_common.calibration MODEL_DIR --validation-file FILE [--over-passages]`` (re)fits a
model directory's calibration on a SQuAD-format file and prints the expected calibration error
before and after on it. Training (``train_job``) runs the one-paragraph fit on its validation split
when it exports a model.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

import numpy as np

from qa_common.config import FITTED_SETTINGS, QAConfig
from qa_common.decoding import (NULL_SPAN, Candidates, _logit, _sigmoid, calibrated_scores, no_answer_probability,
                                rank_candidates)
from qa_common.metric import normalize_answer

BINS = 10  # equal-width confidence bins of the expected calibration error and the reliability diagram
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


def passage_groups(records: Sequence[dict]) -> list[tuple[str, tuple[str, ...], list[str]]]:
    """``(question, passages, gold answers)`` per ``group`` of SQuAD-format records (``library_job mine``
    writes one record per passage the library returned for a question): the golds are every answer
    any of its passages holds, none when the library did not return one that holds it."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        if record.get("group") is None:
            raise ValueError(f"question {record['id']!r} has no 'group': calibrating over passages needs each "
                             "question's retrieved passages, as `python -m library_job mine` writes them")
        groups.setdefault(record["group"], []).append(record)
    return [(group[0]["question"], tuple(r["context"] for r in group),
             sorted({text for r in group for text in r["answers"]["text"]})) for group in groups.values()]


def calibrate_passages(runner, tokenizer, groups: Sequence[tuple[str, Sequence[str], Sequence[str]]], config: QAConfig,
                       *, chunk: int = 64) -> tuple[QAConfig, dict]:
    """``config`` with its ``passages_calibration`` fitted on ``groups`` (:func:`passage_groups`), each
    question read over all its passages as one candidate set, as ``decode_passages`` reads a library's.

    A model that abstains gets its no-answer threshold chosen here too (the official best-F1
    threshold over these questions, where "the library does not hold it" is the right answer to a
    question none of whose passages holds one), then :func:`fit` calibrates the score and the
    no-answer probability at that threshold, and :func:`choose_score_map` keeps the score map (none,
    the one-paragraph one, or the one refitted here) that is best calibrated on held-out questions.
    """
    from tqdm.auto import tqdm

    from qa_common.decoding import PASSAGE_SEPARATOR, passages_laid_end_to_end
    from qa_common.inference import PassagesQuestion, question_logits
    from qa_common.metric import evaluate_answers

    raw = uncalibrated(config.replace(passages_calibration={}))
    logits, contexts, golds = [], [], []
    for first in tqdm(range(0, len(groups), chunk), desc="reading over passages", unit_scale=chunk, unit="question"):
        batch = groups[first : first + chunk]
        questions = [PassagesQuestion(question, tuple(passages)) for question, passages, _ in batch]
        for (_, passages, answers), (start, end, offsets, of_window) in zip(
                batch, question_logits(runner, tokenizer, questions, raw)):
            logits.append((start, end, passages_laid_end_to_end(offsets, of_window, passages)[1]))
            contexts.append(PASSAGE_SEPARATOR.join(passages))
            golds.append(list(answers))
    report = {}
    if raw.version_2_with_negative:
        spans = raw.replace(version_2_with_negative=False)
        answers = {}
        for index, ((start, end, offsets), context) in enumerate(zip(logits, contexts)):
            best = rank_candidates(start, end, offsets, spans)
            span = best.spans[0] if best.spans else NULL_SPAN
            answers[str(index)] = {"answer": context[span[0] : span[1]] if span != NULL_SPAN else "",
                                   "no_answer_probability": best.no_answer_probability}
        references = {str(index): gold for index, gold in enumerate(golds)}
        _, one_paragraph = evaluate_answers(answers, references, version_2_with_negative=True,
                                            threshold=uncalibrated(config).no_answer_threshold)
        _, chosen = evaluate_answers(answers, references, version_2_with_negative=True)
        raw = raw.replace(no_answer_threshold=chosen["no_answer_threshold"])
        report.update(f1_at_one_paragraph_threshold=one_paragraph["f1"], f1_at_passages_threshold=chosen["f1"])
    calibrated, fitted = fit(logits, contexts, golds, raw)
    unmapped = calibrated.replace(score_calibration=())
    softmax, correct = score_outcomes([rank_candidates(*question, unmapped) for question in logits], contexts, golds,
                                      unmapped)
    chosen, score_map, errors = choose_score_map(softmax, correct, {"one_paragraph": config.score_calibration,
                                                                    "refit": calibrated.score_calibration})
    calibrated = calibrated.replace(score_calibration=score_map)
    report = {**fitted, **report, "score_map": chosen, "score_ece_cross_fitted": errors}
    return config.replace(passages_calibration={name: getattr(calibrated, name) for name in FITTED_SETTINGS}), report


def choose_score_map(softmax: Sequence[float], correct: Sequence[bool], maps: dict, *, seed: int = 0
                     ) -> tuple[str, tuple, dict]:
    """``(name, knots, {name: ECE})``: of no map, the given ``maps`` and, under the name ``"refit"``,
    an isotonic map fitted on these questions, the one with the least expected calibration error on
    questions it was not fitted on (two folds: a refit map is fitted on one half and measured on the
    other, both ways round; a given map is measured on both halves alike). A map refitted on a
    library's own retrievals can follow that set more than it transfers to the next."""
    scores, right = np.asarray(softmax, dtype=np.float64), np.asarray(correct, dtype=bool)
    folds = np.random.default_rng(seed).permutation(len(scores)) % 2 == 0
    candidates = {"none": (), **{name: knots for name, knots in maps.items() if name != "refit"}}
    errors = {}
    for name, knots in candidates.items():
        mapped = calibrated_scores(scores, QAConfig(score_calibration=knots))
        errors[name] = float(np.mean([expected_calibration_error(mapped[fold], right[fold]) for fold in (folds, ~folds)]))
    if "refit" in maps:
        halves = []
        for fitted_on, measured_on in ((folds, ~folds), (~folds, folds)):
            knots = fit_score_map(scores[fitted_on], right[fitted_on])
            halves.append(expected_calibration_error(calibrated_scores(scores[measured_on], QAConfig(score_calibration=knots)),
                                                     right[measured_on]))
        errors["refit"] = float(np.mean(halves))
        candidates["refit"] = maps["refit"]
    name = min(errors, key=lambda key: errors[key])
    return name, candidates[name], {key: round(value, 4) for key, value in errors.items()}


def describe(report: dict) -> str:
    if report["score_knots"]:
        text = (f"score: isotonic map of {report['score_knots']} knots, expected calibration error "
                f"{report['score_ece_before']:.3f} -> {report['score_ece_after']:.3f}")
    else:
        text = (f"score: left uncalibrated (fewer than {MIN_SCORE_QUESTIONS} questions), expected calibration "
                f"error {report['score_ece_before']:.3f}")
    if "no_answer_ece_before" in report:
        text += (f"; no-answer probability sigmoid({report['no_answer_scale']:.3f} * d + {report['no_answer_bias']:.3f}): "
                 f"{report['no_answer_ece_before']:.3f} -> {report['no_answer_ece_after']:.3f}")
    return text + f" (on the {report['questions']} questions it was fitted on)"


def main(argv: list[str] | None = None) -> int:
    import json

    from qa_common.backends import BACKENDS, load_runner
    from qa_common.config import load_qa_config, save_qa_config
    from qa_common.data import read_squad

    parser = argparse.ArgumentParser(prog="python -m qa_common.calibration", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a model directory (Hugging Face files and qa_config.json)")
    parser.add_argument("--validation-file", required=True,
                        help="SQuAD-format questions the model did not train on (with unanswerable ones for an "
                             "abstaining model)")
    parser.add_argument("--over-passages", action="store_true",
                        help="fit the calibration a library's answers use (passages_calibration): each question "
                             "read over its retrieved passages, as `python -m library_job mine` writes them")
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help="the backend that answers (default: torch)")
    args = parser.parse_args(argv)
    try:
        records = read_squad(args.validation_file)
        groups = passage_groups(records) if args.over_passages else None
        config = load_qa_config(args.model_dir)
        runner, tokenizer, _ = load_runner(args.model_dir, args.backend)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if groups is not None:
        calibrated, report = calibrate_passages(runner, tokenizer, groups, config)
        print(f"over passages ({len(groups)} questions): ", end="")
    else:
        calibrated, report = calibrate(runner, tokenizer, records, config)
    save_qa_config(calibrated, args.model_dir)
    print(describe(report))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
