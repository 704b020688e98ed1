"""An answer's confidence over a library's passages: what the decoder knows of it, weighed together.

Read over several passages, an answer's softmax share is not all the decoder knows of how likely it
is to be right. It also knows the strongest rival's share, how sure the model is that the passages
hold no answer, whether the answer is that null answer, in how many spans and passages it was found,
how far down the search's order its passage came, how long it is, and how strongly the reader
pointed at it before normalising. A logistic model of those :data:`FEATURES`, fitted on a library's
own retrievals by ``python -m qa_common.calibration --over-passages`` (stored as ``answer_confidence``
in the model's ``passages_calibration``), ranks answers by how likely they are to be right better
than the share alone; the score map is then fitted on its output. It is the calibrator of Kamath,
Jia & Liang (2020, "Selective Question Answering under Domain Shift"), which fits a classifier on
the reader's own top-answer probabilities and lengths to decide when to answer, with a logistic
model (ten numbers, applied with NumPy alone) in place of their random forest. It changes the
score and nothing else: every answer, its rank and the abstention stay those of the decoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qa_common.decoding import NULL_SPAN, Candidates

# One column per feature, in this order; ``answer_confidence`` is the intercept then one weight each.
FEATURES = (
    "share",  # log-odds of the answer's softmax share among the question's merged answers
    "rival_share",  # log-odds of the best share among the other answers
    "no_answer",  # log-odds of the question's no-answer probability
    "is_null",  # 1 for the null answer ("not in these passages")
    "spans",  # ln(1 + the spans merged into the answer); 0 for the null answer
    "passages",  # the passages those spans are in; 0 for the null answer
    "passage_rank",  # the search rank of its best span's passage, 0 first; -1 for the null answer
    "words",  # ln(1 + its words)
    "logit",  # its logit before the softmax (merged: the log-sum-exp of its spans')
)
_EDGE = 1e-6  # shares and probabilities are clipped this far from 0 and 1 before their log-odds


def _log_odds(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EDGE, 1 - _EDGE)
    return np.log(p) - np.log1p(-p)


def answer_features(candidates: Candidates, texts: Sequence[str], bases: np.ndarray,
                    which: Sequence[int]) -> np.ndarray:
    """``(len(which), len(FEATURES))``: the features of the ranked answers ``which`` (indices into
    merged candidates, as :func:`qa_common.passage_decoding.passage_candidates` returns them; ``bases``:
    where each passage starts in the text laid end to end,
    :func:`qa_common.passage_decoding.passages_laid_end_to_end`)."""
    shares = candidates.scores()  # the softmax, uncalibrated
    top_two = np.sort(shares)[::-1][:2]
    rows = []
    for index in which:
        span, share = candidates.spans[index], shares[index]
        rival = (top_two[1] if len(top_two) > 1 else 0.0) if share == top_two[0] else top_two[0]
        if span == NULL_SPAN:
            rows.append((share, rival, 1.0, 0.0, 0.0, -1.0, 0.0, candidates.logits[index]))
            continue
        spans = [span, *(candidates.copies[index] if candidates.copies else ())]
        passages = np.searchsorted(bases, [start for start, _ in spans], side="right") - 1
        rows.append((share, rival, 0.0, np.log1p(len(spans)), len(set(passages.tolist())), float(passages[0]),
                     np.log1p(len(texts[index].split())), candidates.logits[index]))
    share, rival, is_null, spans, passages, rank, words, logit = np.asarray(rows, dtype=np.float64).reshape(-1, 8).T
    no_answer = np.full(len(rows), _log_odds(candidates.no_answer_probability))
    return np.column_stack([_log_odds(share), _log_odds(rival), no_answer, is_null, spans, passages, rank, words, logit])


def answer_confidence(features: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """The logistic model's probability that each answer is right: ``sigmoid(w0 + features @ w)``."""
    z = weights[0] + np.asarray(features, dtype=np.float64) @ np.asarray(weights[1:], dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # the sigmoid, without overflow


def confidence_scores(candidates: Candidates, texts: Sequence[str], bases: np.ndarray, which: Sequence[int],
                      weights: Sequence[float]) -> np.ndarray:
    """The confidence of the ranked answers ``which`` (in rank order), each never higher than one
    before it: the ranking is the decoder's, and a score that rose down the list would contradict it.
    An answer's score depends on the answers ranked above it only, not on how many follow."""
    return np.minimum.accumulate(answer_confidence(answer_features(candidates, texts, bases, which), weights))


def fit_answer_confidence(features: np.ndarray, correct: Sequence[bool]) -> tuple[float, ...]:
    """The intercept and weights of a logistic regression of ``correct`` on ``features`` (one row per
    question's top answer), L2-regularised as scikit-learn's default on standardised features."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(features, dtype=np.float64)
    mean, spread = x.mean(axis=0), x.std(axis=0)
    spread = np.where(spread > 0, spread, 1.0)  # a constant feature gets no weight to speak of
    model = LogisticRegression(max_iter=1000).fit((x - mean) / spread, np.asarray(correct, dtype=bool))
    weights = model.coef_[0] / spread
    return (float(model.intercept_[0] - weights @ mean), *map(float, weights))
