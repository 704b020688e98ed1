"""The fit a library's answers use: each mined question read over its retrieved passages at once."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qa_common.calibration.measures import expected_calibration_error
from qa_common.calibration.paragraphs import fit, fit_score_map, score_outcomes, uncalibrated
from qa_common.config import FITTED_SETTINGS, QAConfig
from qa_common.decoding import calibrated_scores
from qa_common.metric import evaluate_answers
from qa_common.passage_decoding import passage_candidates


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
    candidate set, as ``decode_passages`` reads a library's.

    First the weight of the search's order (``passage_rank_weight``, :func:`qa_common.passage_decoding.with_rank_prior`):
    of :data:`PASSAGE_RANK_WEIGHTS`, the one whose answers score the best F1 over these questions
    (the smallest on a tie). A model that abstains gets its no-answer threshold chosen with it (the
    official best-F1 threshold at each weight, where "the library does not hold it" is the right
    answer to a question none of whose passages holds one). Then :func:`fit` calibrates the score
    and the no-answer probability at that weight and threshold, and :func:`choose_score_map` keeps
    the score map (none, the one-paragraph one, or the one refitted here) that is best calibrated on
    held-out articles.
    """
    from tqdm.auto import tqdm

    from qa_common.passage_decoding import PASSAGE_SEPARATOR, passages_laid_end_to_end, with_rank_prior
    from qa_common.inference import PassagesQuestion, question_logits

    raw = uncalibrated(config.replace(passages_calibration={}))
    logits, windows, contexts, golds = [], [], [], []
    for first in tqdm(range(0, len(groups), chunk), desc="reading over passages", unit_scale=chunk, unit="question"):
        batch = groups[first : first + chunk]
        questions = [PassagesQuestion(question, tuple(passages)) for question, passages, _, _ in batch]
        for (_, passages, answers, _), (start, end, offsets, of_window) in zip(
                batch, question_logits(runner, tokenizer, questions, raw)):
            logits.append((start, end, passages_laid_end_to_end(offsets, of_window, passages)[1]))
            windows.append(of_window)
            contexts.append(PASSAGE_SEPARATOR.join(passages))
            golds.append(list(answers))
    # Each weight's best spans, decoded once: scored at the best threshold here, at the one-paragraph one below.
    references = {str(index): gold for index, gold in enumerate(golds)}
    by_weight = {}
    for weight in PASSAGE_RANK_WEIGHTS:
        weighted = [(with_rank_prior(start, of_window, weight), end, offsets)
                    for (start, end, offsets), of_window in zip(logits, windows)]
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
    # The score map is chosen, and refitted, on the answers as served: the same answer's spans merged.
    softmax, correct = score_outcomes([passage_candidates(*question, context, unmapped)[0]
                                       for question, context in zip(logits, contexts)], contexts, golds, unmapped)
    chosen, score_map, errors = choose_score_map(softmax, correct, {"one_paragraph": config.score_calibration,
                                                                    "refit": fit_score_map(softmax, correct)},
                                                 articles=[article for *_, article in groups])
    calibrated = calibrated.replace(score_calibration=score_map)
    mapped = calibrated_scores(np.asarray(softmax, dtype=np.float64), calibrated)
    report = {**fitted, **report, "score_map": chosen, "score_knots": len(score_map), "score_ece_cross_fitted": errors,
              "score_ece_before": expected_calibration_error(softmax, correct),
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
    if articles is not None and len(set(articles)) >= 2:
        folds = article_folds(articles, seed)
    else:
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
