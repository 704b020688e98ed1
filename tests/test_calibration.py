"""Calibrated scores: the isotonic score map and the no-answer scaling are fitted, stored and applied."""

import math

import numpy as np
import pytest

from qa_common import QAConfig, decode_spans, load_qa_config, save_qa_config
from qa_common.calibration import (
    expected_calibration_error, fit, fit_no_answer_scaling, fit_score_map, reliability, uncalibrated,
)
from qa_common.calibration.paragraphs import MIN_SCORE_QUESTIONS
from qa_common.decoding import calibrated_scores, rank_candidates

CONTEXT = "Warfarin slows blood clotting in the body."
OFFSETS = np.array([[-1, -1], [-1, -1], [0, 8], [9, 14], [15, 20], [21, 29], [-1, -1]])


def test_the_isotonic_score_map_calibrates_an_under_confident_score_on_new_questions():
    rng = np.random.default_rng(0)

    def sample(n):  # right more often than the score says, at every score (as SQuAD models are)
        scores = rng.uniform(0, 1, size=n)
        return scores, rng.random(n) < np.minimum(1.0, 0.15 + scores)

    scores, correct = sample(4000)
    knots = fit_score_map(scores, correct)
    assert knots[0][0] == 0.0 and knots[-1][0] == 1.0
    assert all(a[1] <= b[1] for a, b in zip(knots, knots[1:]))
    fresh, outcomes = sample(4000)
    mapped = calibrated_scores(fresh, QAConfig(score_calibration=knots))
    assert expected_calibration_error(fresh, outcomes) > 0.1
    assert expected_calibration_error(mapped, outcomes) < 0.03
    assert fit_score_map(scores[: MIN_SCORE_QUESTIONS - 1], correct[: MIN_SCORE_QUESTIONS - 1]) == ()


def test_the_score_map_kept_is_the_one_best_calibrated_on_questions_it_was_not_fitted_on():
    from qa_common.calibration import choose_score_map

    rng = np.random.default_rng(1)
    scores = rng.uniform(0, 1, size=2000)
    correct = rng.random(2000) < np.minimum(1.0, 0.15 + scores)  # under-confident, as before
    lifted = ((0.0, 0.15), (0.85, 1.0), (1.0, 1.0))  # the map that is true for this data
    wrong = ((0.0, 0.0), (1.0, 0.5))
    name, knots, errors = choose_score_map(scores, correct, {"one_paragraph": wrong, "refit": fit_score_map(scores, correct)})
    assert name == "refit" and knots and errors["refit"] < errors["none"] < errors["one_paragraph"]
    name, knots, errors = choose_score_map(scores, correct, {"one_paragraph": lifted, "refit": fit_score_map(scores, correct)})
    assert name == "one_paragraph" and knots == lifted and errors["one_paragraph"] < errors["refit"]
    # Too few questions to refit on half of them: the refitted map counts as none.
    few = choose_score_map(scores[:300], correct[:300], {"refit": fit_score_map(scores[:300], correct[:300])})
    assert few[2]["refit"] == few[2]["none"]


def test_a_map_refitted_on_some_articles_is_judged_on_other_articles():
    from qa_common.calibration import choose_score_map
    from qa_common.calibration.passages import article_folds

    articles = [f"article {n % 8}" for n in range(4000)]
    folds = article_folds(articles)
    assert {folds[i] for i in range(8)} == {True, False}  # both folds hold articles ...
    for title in set(articles):  # ... and no article is split between them
        assert len({fold for fold, article in zip(folds, articles) if article == title}) == 1
    # Each article shifts how often a score is right (its own difficulty): judged on questions of
    # the articles it was fitted on, a refitted map learns the shifts of exactly those articles.
    rng = np.random.default_rng(3)
    shift = {f"article {n}": value for n, value in enumerate(rng.uniform(-0.35, 0.35, size=8))}
    scores = rng.uniform(0, 1, size=4000)
    correct = rng.random(4000) < np.clip(scores + np.array([shift[a] for a in articles]), 0, 1)
    maps = {"refit": fit_score_map(scores, correct)}
    by_question = choose_score_map(scores, correct, maps)[2]["refit"]
    by_article = choose_score_map(scores, correct, maps, articles=articles)[2]["refit"]
    assert by_article > by_question + 0.02


def test_no_answer_scaling_is_logistic_regression_with_a_positive_slope():
    rng = np.random.default_rng(1)
    differences = rng.normal(0, 3, size=5000)
    unanswerable = rng.random(5000) < 1 / (1 + np.exp(-(0.5 * differences - 1.0)))
    scale, bias = fit_no_answer_scaling(differences, unanswerable)
    assert scale == pytest.approx(0.5, rel=0.15) and bias == pytest.approx(-1.0, abs=0.2)
    assert fit_no_answer_scaling(differences, np.zeros(5000, bool)) == (1.0, 0.0)  # one kind only: identity


def test_ece_and_reliability_bins():
    assert expected_calibration_error([0.8] * 10, [True] * 8 + [False] * 2) == pytest.approx(0.0)
    assert expected_calibration_error([0.9] * 10, [True] * 5 + [False] * 5) == pytest.approx(0.4)
    rows = reliability([0.05, 0.95, 1.0], [False, True, True])
    assert rows[0]["count"] == 1 and rows[-1]["count"] == 2 and rows[-1]["accuracy"] == 1.0


def _question(best: int, null: float, gap: float):
    """Logits of one window: the best span at token ``best`` (one token), the null score at [CLS]."""
    start, end = np.zeros(len(OFFSETS)), np.zeros(len(OFFSETS))
    start[0] = end[0] = null / 2
    start[best] = end[best] = gap / 2
    return start[None], end[None], OFFSETS[None]


def test_calibration_keeps_every_decision_and_decoding_applies_it():
    rng = np.random.default_rng(2)
    logits, golds = [], []
    words = {2: "Warfarin", 3: "slows", 4: "blood", 5: "clotting"}
    for _ in range(400):
        best = int(rng.integers(2, 6))
        logits.append(_question(best, null=float(rng.normal(0, 4)), gap=float(rng.normal(3, 2))))
        kind = rng.random()
        golds.append([] if kind < 0.3 else [words[best]] if kind < 0.8 else [words[2 + (best - 1) % 4]])
    raw = QAConfig(version_2_with_negative=True, no_answer_threshold=0.4)
    calibrated, report = fit(logits, [CONTEXT] * len(logits), golds, raw)
    assert calibrated.score_calibration and calibrated.no_answer_scale != 1.0
    assert report["score_ece_after"] < report["score_ece_before"]
    assert report["no_answer_ece_after"] < report["no_answer_ece_before"]
    assert uncalibrated(calibrated).no_answer_threshold == pytest.approx(0.4)
    for start, end, offsets in logits:
        before = decode_spans(start, end, offsets, CONTEXT, raw, top_k=3)
        after = decode_spans(start, end, offsets, CONTEXT, calibrated, top_k=3)
        assert [(a["start"], a["end"]) for a in before] == [(a["start"], a["end"]) for a in after]
        d = after[0]["no_answer_probability"]
        raw_d = before[0]["no_answer_probability"]
        assert d == pytest.approx(1 / (1 + math.exp(-(calibrated.no_answer_scale * math.log(raw_d / (1 - raw_d))
                                                      + calibrated.no_answer_bias))), abs=1e-9)


def test_the_score_map_is_applied_stored_and_validated(tmp_path):
    start, end, offsets = _question(3, null=-5.0, gap=4.0)
    plain = rank_candidates(start, end, offsets, QAConfig()).scores()
    mapped = QAConfig(score_calibration=[[0.0, 0.2], [1.0, 0.9]])  # JSON gives lists
    scores = rank_candidates(start, end, offsets, mapped).scores(mapped)
    assert scores == pytest.approx([0.2 + 0.7 * p for p in plain])
    assert sum(plain) == pytest.approx(1.0) and max(scores) == scores[0]
    answers = decode_spans(start, end, offsets, CONTEXT, mapped, top_k=50)
    assert answers[0]["score"] == pytest.approx(scores[0]) and len(answers) < len(scores)
    save_qa_config(mapped, tmp_path)
    assert load_qa_config(tmp_path).score_calibration == ((0.0, 0.2), (1.0, 0.9))
    for bad in ([[0.0, 0.5], [1.0, 0.4]], [[0.0, 0.1], [1.5, 0.9]], [[0.5, 0.5]], [[0.0, 0.1], [0.0, 0.2]], "x"):
        with pytest.raises(ValueError, match="score_calibration must be a list of"):
            QAConfig(score_calibration=bad)


def test_selective_answering_takes_the_highest_scores_while_precision_holds():
    from qa_common.calibration import answered_at_precision

    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
    right = [True, True, True, False, True, True, False, False, False, False]
    assert answered_at_precision(scores, right, 0.8) == 0.6  # top 6: 5 right; top 7 would be 5/7
    assert answered_at_precision(scores, right, 1.0) == 0.3
    assert answered_at_precision(scores[::-1], right[::-1], 0.8) == 0.6  # the order given does not matter
    assert answered_at_precision([0.9, 0.1], [False, True], 0.9) == 0.0
