"""An answer's confidence over passages: the logistic model of what the decoder knows of it
(qa_common.confidence), fitted and kept only where it ranks right answers first better than the share."""

import math

import numpy as np
import pytest

from qa_common import QAConfig, decode_passages
from qa_common.calibration import answered_at_precision
from qa_common.calibration.measures import risk_coverage_area
from qa_common.calibration.passages import choose_confidence
from qa_common.confidence import FEATURES, answer_confidence, fit_answer_confidence
from test_decoding import CONTEXT, OFFSETS, _logits

OTHER = "Heparin is given as a bolus."
OTHER_OFFSETS = np.array([[-1, -1], [-1, -1], [-1, -1], [-1, -1], [0, 7], [8, 10], [11, 16], [17, 19],
                          [20, 21], [22, 27], [27, 28], [-1, -1], [-1, -1]])
COPY = "Warfarin slows Blood clotting in the body."  # the same answer as CONTEXT's once normalised


def _read(passages, windows, config, top_k=2):
    offsets = np.stack([OTHER_OFFSETS if passage == OTHER else OFFSETS for passage in passages])
    start, end = (np.vstack([w[i] for w in windows]) for i in (0, 1))
    return decode_passages(start, end, offsets, list(range(len(passages))), passages, config, top_k=top_k)


def _weights(**named) -> tuple[float, ...]:
    return (named.pop("intercept", 0.0), *(named.pop(name, 0.0) for name in FEATURES))


def test_the_score_is_the_models_probability_and_the_answers_stay_the_decoders():
    heparin = _logits({4: 3.25}, {4: 3.25})  # "Heparin": 6.5
    clotting = _logits({6: 3.0}, {7: 3.0})  # "blood clotting": 6.0 in each passage that holds it
    passages, windows = [OTHER, CONTEXT, COPY], [heparin, clotting, clotting]
    share = _read(passages, windows, QAConfig())
    assert [(a["answer"], a["passage"]) for a in share] == [("blood clotting", 1), ("Heparin", 0)]

    # Only "spans" weighs: ln(1 + 2) for the answer found twice, ln 2 for the lone one, each through the sigmoid.
    weights = _weights(intercept=-1.0, spans=2.0)
    scored = _read(passages, windows, QAConfig(passages_calibration={"answer_confidence": weights}))
    assert [(a["answer"], a["passage"], a["start"]) for a in scored] == [(a["answer"], a["passage"], a["start"])
                                                                         for a in share]
    sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert scored[0]["score"] == pytest.approx(sigmoid(-1.0 + 2.0 * math.log(3)))
    assert scored[1]["score"] == pytest.approx(sigmoid(-1.0 + 2.0 * math.log(2)))
    assert scored[0]["no_answer_probability"] == share[0]["no_answer_probability"]

    # A model that would score the second answer higher is capped at the first's: scores follow the ranking.
    reversed_order = _read(passages, windows, QAConfig(passages_calibration={"answer_confidence": _weights(spans=-2.0)}))
    assert reversed_order[0]["score"] == pytest.approx(sigmoid(-2.0 * math.log(3)))
    assert reversed_order[1]["score"] == reversed_order[0]["score"]
    # The top answer's score does not depend on how many answers follow.
    assert _read(passages, windows, QAConfig(passages_calibration={"answer_confidence": weights}), top_k=1) == scored[:1]


def test_the_weights_are_checked_when_a_model_is_loaded():
    QAConfig(answer_confidence=[0.5] * (len(FEATURES) + 1))
    for bad in ([0.5] * len(FEATURES), "0123456789", [True] * (len(FEATURES) + 1), [math.nan] * (len(FEATURES) + 1)):
        with pytest.raises(ValueError, match="answer_confidence must be empty or"):
            QAConfig(passages_calibration={"answer_confidence": bad})


def _questions(n, rng, signal):
    """Top answers whose share says something of being right; with ``signal`` their "passages"
    feature says more (an answer several passages agree on is right more often)."""
    share = rng.uniform(0.05, 0.95, n)
    passages = rng.integers(1, 5, n).astype(float)
    odds = 2.0 * (share - 0.5) + (1.5 * (passages - 2.5) if signal else 0.0)
    correct = rng.random(n) < 1 / (1 + np.exp(-odds))
    features = np.zeros((n, len(FEATURES)))
    features[:, FEATURES.index("share")] = np.log(share / (1 - share))
    features[:, FEATURES.index("passages")] = passages
    articles = [f"article {i % 40}" for i in range(n)]
    return share, list(features), correct, articles


@pytest.mark.parametrize("signal", [True, False])
def test_the_model_is_kept_only_where_it_ranks_right_answers_first_on_held_out_articles(signal):
    rng = np.random.default_rng(0)
    share, features, correct, articles = _questions(3000, rng, signal)
    weights, scores, report = choose_confidence(share, features, correct, articles)
    area = {name: figures["risk_coverage_area"] for name, figures in report.items()}
    if signal:
        assert weights and area["logistic model"] < area["softmax share"]
        assert weights[1 + FEATURES.index("passages")] > 1.0
        assert scores == pytest.approx(answer_confidence(np.array(features), weights).tolist())
        fresh_share, fresh_features, fresh_correct, _ = _questions(3000, rng, signal)
        learned = answer_confidence(np.array(fresh_features), weights)
        assert answered_at_precision(learned, fresh_correct, 0.8) > answered_at_precision(fresh_share, fresh_correct, 0.8) + 0.1
    else:  # nothing to learn beyond the share: it stays
        assert weights == () and scores == pytest.approx(share.tolist())
    assert choose_confidence(share[:100], features[:100], correct[:100], articles[:100]) == ((), share[:100].tolist(), {})


def test_the_fit_returns_the_weights_of_the_features_as_given():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5000, len(FEATURES))) * np.arange(1, len(FEATURES) + 1) + 3.0
    z = 0.5 + 0.8 * (x[:, 0] - 3.0) - 0.2 * (x[:, 4] - 3.0)
    weights = fit_answer_confidence(x, rng.random(5000) < 1 / (1 + np.exp(-z)))
    assert weights[1] == pytest.approx(0.8, abs=0.1) and weights[5] == pytest.approx(-0.2, abs=0.05)
    assert weights[0] == pytest.approx(0.5 - 0.8 * 3.0 + 0.2 * 3.0, abs=0.3)


def test_the_risk_coverage_area_is_lower_for_a_ranking_with_right_answers_first():
    correct = [True, True, False, True, False]
    assert risk_coverage_area([5, 4, 3, 2, 1], correct) == pytest.approx(np.mean([0, 0, 1 / 3, 1 / 4, 2 / 5]))
    assert risk_coverage_area([5, 4, 1, 3, 0], correct) < risk_coverage_area([5, 4, 3, 2, 1], correct)
