"""The fit a library's answers use: each mined question read over its retrieved passages at once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qa_common.calibration.measures import answered_at_precision, expected_calibration_error, risk_coverage_area
from qa_common.calibration.paragraphs import MIN_SCORE_QUESTIONS, fit, fit_score_map, score_outcomes, uncalibrated
from qa_common.confidence import FEATURES, answer_confidence, answer_features, fit_answer_confidence
from qa_common.config import FITTED_SETTINGS, QAConfig
from qa_common.decoding import calibrated_scores
from qa_common.metric import evaluate_answers
from qa_common.passage_decoding import PASSAGE_SEPARATOR, passage_candidates, passages_laid_end_to_end, with_rank_prior


def passage_groups(records: Sequence[dict]) -> list[tuple[str, tuple[str, ...], list[str], str]]:
    """``(question, passages, gold answers, article)`` per ``group`` of SQuAD-format records (``library_job
    mine`` writes one record per passage the library returned for a question): the golds are every
    answer any of its passages holds, none when the library did not return one that holds it; the
    article is the question's title."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        if record.get("group") is None:
            raise ValueError(f"question {record['id']!r} has no 'group': calibrating over passages needs each "
                             "question's retrieved passages, as `python -m library_job mine` writes them")
        groups.setdefault(record["group"], []).append(record)
    return [(group[0]["question"], tuple(r["context"] for r in group),
             sorted({text for r in group for text in r["answers"]["text"]}), group[0].get("title", ""))
            for group in groups.values()]


PASSAGE_RANK_WEIGHTS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)  # the grid the search order's weight is chosen from


def calibrate_passages(runner, tokenizer, groups: Sequence[tuple[str, Sequence[str], Sequence[str], str]], config: QAConfig,
                       *, chunk: int = 64) -> tuple[QAConfig, dict]:
    """``config`` with its ``passages_calibration`` fitted on ``groups`` (:func:`passage_groups`, each
    question's passages in the search's order), each question read over all its passages as one
    candidate set, as ``decode_passages`` reads a library's: :func:`fit_over_passages` on the logits."""
    from tqdm.auto import tqdm

    from qa_common.inference import PassagesQuestion, question_logits

    raw = uncalibrated(config.replace(passages_calibration={}))
    read = []
    for first in tqdm(range(0, len(groups), chunk), desc="reading over passages", unit_scale=chunk, unit="question"):
        batch = groups[first : first + chunk]
        questions = [PassagesQuestion(question, tuple(passages)) for question, passages, _, _ in batch]
        read.extend(ReadOverPassages(start, end, offsets, of_window, tuple(passages), list(answers), article)
                    for (_, passages, answers, article), (start, end, offsets, of_window)
                    in zip(batch, question_logits(runner, tokenizer, questions, raw)))
    return fit_over_passages(read, config)


@dataclass(frozen=True)
class ReadOverPassages:
    """One calibration question as the reader saw it: the logits and offsets of its windows (window ``i``
    of ``passages[window_passages[i]]``), its passages in the search's order, its golds and its article."""

    start: np.ndarray
    end: np.ndarray
    offsets: np.ndarray
    window_passages: Sequence[int]
    passages: tuple[str, ...]
    golds: list[str]
    article: str


def fit_over_passages(read: Sequence[ReadOverPassages], config: QAConfig) -> tuple[QAConfig, dict]:
    """``config`` with its ``passages_calibration`` fitted on questions ``read`` over their passages.

    First the weight of the search's order (``passage_rank_weight``, :func:`qa_common.passage_decoding.with_rank_prior`):
    of :data:`PASSAGE_RANK_WEIGHTS`, the one whose answers score the best F1 over these questions
    (the smallest on a tie). A model that abstains gets its no-answer threshold chosen with it (the
    official best-F1 threshold at each weight, where "the library does not hold it" is the right
    answer to a question none of whose passages holds one). Then :func:`fit` calibrates the
    no-answer probability at that weight and threshold. On the answers as served (the same answer's
    spans merged), :func:`choose_confidence` keeps the logistic model of :mod:`qa_common.confidence`
    where it ranks right answers above wrong ones better than the softmax share on held-out
    articles, and :func:`choose_score_map` keeps the score map (none, the one-paragraph one where
    the score is the share, or one refitted here) that is best calibrated on held-out articles.
    """
    raw = uncalibrated(config.replace(passages_calibration={}))
    laid = [passages_laid_end_to_end(q.offsets, q.window_passages, q.passages) for q in read]
    logits = [(q.start, q.end, offsets) for q, (_, offsets) in zip(read, laid)]
    contexts = [PASSAGE_SEPARATOR.join(q.passages) for q in read]
    golds = [q.golds for q in read]
    # Each weight's best spans, decoded once: scored at the best threshold here, at the one-paragraph one below.
    references = {str(index): gold for index, gold in enumerate(golds)}
    by_weight = {}
    for weight in PASSAGE_RANK_WEIGHTS:
        weighted = [(with_rank_prior(start, q.window_passages, weight), end, offsets)
                    for (start, end, offsets), q in zip(logits, read)]
        best_spans = span_answers(weighted, contexts, raw)
        _, metrics = evaluate_answers(best_spans, references, version_2_with_negative=raw.version_2_with_negative)
        by_weight[weight] = (weighted, best_spans, metrics)
    weight = max(by_weight, key=lambda w: (by_weight[w][2]["f1"], -w))
    logits, best_spans, chosen = by_weight[weight]
    report = {"passage_rank_weight": weight, "f1_by_passage_rank_weight": {str(w): round(m["f1"], 4)
                                                                           for w, (*_, m) in by_weight.items()}}
    raw = raw.replace(passage_rank_weight=weight)
    if raw.version_2_with_negative:
        _, one_paragraph = evaluate_answers(best_spans, references, version_2_with_negative=True,
                                            threshold=uncalibrated(config).no_answer_threshold)
        raw = raw.replace(no_answer_threshold=chosen["no_answer_threshold"])
        report.update(f1_at_one_paragraph_threshold=one_paragraph["f1"], f1_at_passages_threshold=chosen["f1"])
    calibrated, fitted = fit(logits, contexts, golds, raw)
    unmapped = calibrated.replace(score_calibration=())
    # The score is chosen, and its map fitted, on the answers as served: the same answer's spans merged.
    served = [passage_candidates(*question, context, unmapped) for question, context in zip(logits, contexts)]
    softmax, correct = score_outcomes([candidates for candidates, _ in served], contexts, golds, unmapped)
    features = [answer_features(candidates, texts, bases, [0])[0] if candidates.spans else None
                for (candidates, texts), (bases, _) in zip(served, laid)]
    articles = [q.article for q in read]
    weights, scores, selective = choose_confidence(softmax, features, correct, articles)
    maps = {"refit": fit_score_map(scores, correct)}
    if not weights:
        maps["one_paragraph"] = config.score_calibration
    chosen, score_map, errors = choose_score_map(scores, correct, maps, articles=articles)
    calibrated = calibrated.replace(score_calibration=score_map, answer_confidence=weights)
    mapped = calibrated_scores(np.asarray(scores, dtype=np.float64), calibrated)
    report = {**fitted, **report, "answer_confidence": "logistic model" if weights else "softmax share",
              "selective_cross_fitted": selective, "score_map": chosen, "score_knots": len(score_map),
              "score_ece_cross_fitted": errors, "score_ece_before": expected_calibration_error(softmax, correct),
              "score_ece_after": expected_calibration_error(mapped, correct)}
    return config.replace(passages_calibration={name: getattr(calibrated, name) for name in FITTED_SETTINGS}), report


def span_answers(logits: Sequence[tuple], contexts: Sequence[str], config: QAConfig) -> dict[str, dict]:
    """Each question's best answer (decoded without abstention, as :func:`passage_candidates` ranks
    them) with its no-answer probability, as :func:`qa_common.metric.evaluate_answers` takes them."""
    spans = config.replace(version_2_with_negative=False)
    answers = {}
    for index, ((start, end, offsets), context) in enumerate(zip(logits, contexts)):
        best, texts = passage_candidates(start, end, offsets, context, spans)
        answers[str(index)] = {"answer": texts[0] if texts else "", "no_answer_probability": best.no_answer_probability}
    return answers


def article_folds(articles: Sequence[str], seed: int = 0) -> np.ndarray:
    """True for the questions of a seeded half of the articles: two folds that split no article."""
    titles = sorted(set(articles))
    first = {title for rank, title in enumerate(np.random.default_rng(seed).permutation(titles)) if rank % 2 == 0}
    return np.array([article in first for article in articles], dtype=bool)


def held_out_folds(questions: int, articles: Sequence[str] | None, seed: int = 0) -> np.ndarray:
    """Two folds of the questions: by article (:func:`article_folds`) where they span two or more,
    else a seeded half of the questions."""
    if articles is not None and len(set(articles)) >= 2:
        return article_folds(articles, seed)
    return np.random.default_rng(seed).permutation(questions) % 2 == 0


def choose_confidence(softmax: Sequence[float], features: Sequence[np.ndarray | None], correct: Sequence[bool],
                      articles: Sequence[str], *, seed: int = 0) -> tuple[tuple[float, ...], list[float], dict]:
    """``(weights, scores, report)``: the logistic model of :mod:`qa_common.confidence` fitted on each
    question's top answer (``features``, None for a question with no answer at all, whose score
    stays 0) and the top answers' scores under it, or ``()`` and the ``softmax`` shares unchanged.

    The model is kept when, cross-fitted on two folds of the articles (fitted on one half, scoring the
    other), it ranks right answers above wrong ones better than the softmax share: a smaller area under
    the risk-coverage curve (:func:`risk_coverage_area`). The report holds both areas and the share of
    questions each answers at 80 % and 90 % precision. Fewer than :data:`MIN_SCORE_QUESTIONS`
    questions, or only right or only wrong answers: the share.
    """
    softmax, right = np.asarray(softmax, dtype=np.float64), np.asarray(correct, dtype=bool)
    answered = np.array([row is not None for row in features], dtype=bool)
    if answered.sum() < MIN_SCORE_QUESTIONS or right[answered].all() or not right[answered].any():
        return (), softmax.tolist(), {}
    x = np.zeros((len(features), len(FEATURES)))
    x[answered] = [row for row in features if row is not None]
    folds = held_out_folds(len(softmax), articles, seed)
    crossed = np.zeros_like(softmax)
    for fitted_on, measured_on in ((folds, ~folds), (~folds, folds)):
        fitted_on, measured_on = fitted_on & answered, measured_on & answered
        if right[fitted_on].all() or not right[fitted_on].any():
            return (), softmax.tolist(), {}
        crossed[measured_on] = answer_confidence(x[measured_on], fit_answer_confidence(x[fitted_on], right[fitted_on]))
    report = {name: {"risk_coverage_area": round(risk_coverage_area(scores, right), 4),
                     "answered_at_80": round(answered_at_precision(scores, right, 0.8), 4),
                     "answered_at_90": round(answered_at_precision(scores, right, 0.9), 4)}
              for name, scores in (("softmax share", softmax), ("logistic model", crossed))}
    if report["logistic model"]["risk_coverage_area"] >= report["softmax share"]["risk_coverage_area"]:
        return (), softmax.tolist(), report
    weights = fit_answer_confidence(x[answered], right[answered])
    return weights, np.where(answered, answer_confidence(x, weights), 0.0).tolist(), report


def choose_score_map(softmax: Sequence[float], correct: Sequence[bool], maps: dict, *, seed: int = 0,
                     articles: Sequence[str] | None = None) -> tuple[str, tuple, dict]:
    """``(name, knots, {name: ECE})``: of no map, the given ``maps`` and, under the name ``"refit"``,
    an isotonic map fitted on these questions, the one with the least expected calibration error on
    questions it was not fitted on (two folds: a refit map is fitted on one half and measured on the
    other, both ways round; a given map is measured on both halves alike). With ``articles`` (each
    question's) the folds split the articles, not the questions: questions of one article share its
    difficulty, so folds of questions judge a refitted map on more of the articles it was fitted on,
    where it looks better than it will on the next library's articles."""
    scores, right = np.asarray(softmax, dtype=np.float64), np.asarray(correct, dtype=bool)
    folds = held_out_folds(len(scores), articles, seed)
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
