"""Turn start/end logits back into answer text: the n-best span search, with an optional null answer.

Our answer format everywhere (evaluation, serving, the CLI) is::

    {"answer": str, "score": float, "start": int, "end": int, "no_answer_probability": float}

with ``context[start:end] == answer`` for every non-empty answer. Candidate spans are ranked by
``start_logit + end_logit``, the ranking of the BERT paper and of Hugging Face's ``utils_qa.py``.
Edge cases, all handled here:

- tokens outside the context (question, [CLS], [SEP], padding) have offsets ``(-1, -1)`` and are
  never a start or an end;
- spans with ``end < start`` or longer than ``max_answer_length`` tokens are invalid;
- an example split into several windows is decoded over all of them; the same character span seen
  in two overlapping windows counts once, with its best logit sum;
- when no valid span exists (and abstention is off) the answer is ``NO_ANSWER``:
  ``{"answer": "", "score": 0.0, "start": -1, "end": -1, "no_answer_probability": 1.0}``, the shape
  of the null answer below: ``start == end == -1`` is the one "no span" sentinel.

**score.** How likely the answer is exactly right, over the whole question: the softmax of the
logit sums of every distinct valid candidate span (the ``n_best`` starts x ``n_best`` ends of each
window, from all windows), plus the null candidate when abstention is on, mapped through
``config.score_calibration`` (a non-decreasing piecewise-linear map fitted by isotonic regression
on a validation split, :mod:`qa_common.calibration`, so that a score of 0.8 is right about 8 times
in 10; empty: the raw softmax). The top answer therefore has the highest score and the scores of
the ``top_k`` answers never increase with rank; uncalibrated, they sum to at most 1.

**Different answers.** A ``top_k`` list holds different answers (:func:`distinct_answers`): a
candidate is left out when its span overlaps one ranked above it (the same words with more or fewer
around them: "Denver Broncos" after "the Denver Broncos") or its text, normalised as SQuAD scores it,
equals one ranked above it (the same answer found in a duplicate passage). Each answer keeps its own
score, so the top answer and its score never depend on ``top_k``. Read over several passages, the
spans that read as one answer are first merged into it (:func:`merge_same_answers`): its score is
their summed share of the softmax, and answers are ranked by it.

**The null answer ("not in this document", SQuAD 2.0).** As in Hugging Face's ``run_qa.py
--version_2_with_negative``: the null score is the [CLS] token's start + end logit, the *minimum*
over the question's windows (a window that does not hold the answer points at [CLS] whether or not
another window holds it, so the most telling window is the one least drawn to [CLS]). Every answer
carries::

    no_answer_probability = sigmoid(a * (null_score - best_span_score) + b)

the probability of "no answer" against the best span, with ``a = config.no_answer_scale`` and
``b = config.no_answer_bias`` (Platt scaling fitted on a validation split; 1 and 0 uncalibrated). With ``config.version_2_with_negative`` the
answer is the null answer ``{"answer": "", "score": p_null, "start": -1, "end": -1, ...}`` exactly
when ``no_answer_probability > config.no_answer_threshold`` -- the official SQuAD 2.0 evaluation's
``na_prob > na_prob_thresh`` rule, and Hugging Face's ``null_score - best_span_score >
null_score_diff_threshold`` with ``null_score_diff_threshold = log(t / (1 - t))`` for threshold
``t`` (so ``t = 0.5`` is HF's default 0.0, uncalibrated). Among the ranked answers the null
candidate competes with the logit ``null_score - (log(t / (1 - t)) - b) / a``, which puts it first
exactly when it is the answer; ``p_null`` is its share of the softmax. ``t = 1`` never abstains.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from qa_common.config import QAConfig
from qa_common.metric import normalize_answer

NULL_SPAN = (-1, -1)  # start and end of an answer that is no span: the null answer, or no valid span at all
NO_ANSWER = {"answer": "", "score": 0.0, "start": NULL_SPAN[0], "end": NULL_SPAN[1], "no_answer_probability": 1.0}


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax of a 1-d float64 array that may hold -inf (probability 0) and +inf (sharing all of it)."""
    top = np.max(logits)
    if np.isposinf(top):
        return np.isposinf(logits) / np.count_nonzero(np.isposinf(logits))
    weights = np.exp(logits - top)
    return weights / weights.sum()


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    return math.exp(x) / (1.0 + math.exp(x))


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def no_answer_probability(null_score: float, best_span_score: float, config: QAConfig | None = None) -> float:
    """``sigmoid(a * (null_score - best_span_score) + b)`` with ``config``'s Platt scaling (default
    uncalibrated: a = 1, b = 0); 1.0 when there is no valid span."""
    if best_span_score == -math.inf:
        return 1.0
    scale, bias = (config.no_answer_scale, config.no_answer_bias) if config else (1.0, 0.0)
    return _sigmoid(scale * (null_score - best_span_score) + bias)


def _null_rank_logit(null_score: float, best_span_score: float, config: QAConfig, abstains: bool) -> float:
    """The logit the null candidate competes with: ``null_score - (log(t / (1 - t)) - b) / a``.

    Clamped against the best span so that the null candidate ranks first exactly when the
    probability rule abstains (the two differ by rounding only at the threshold itself).
    """
    t = config.no_answer_threshold
    if t >= 1:
        return -math.inf
    shift = -math.inf if t <= 0 else (_logit(t) - config.no_answer_bias) / config.no_answer_scale
    logit = null_score - shift
    return max(logit, best_span_score) if abstains else min(logit, best_span_score)


@dataclass(frozen=True)
class Candidates:
    """One question's ranked candidate answers before the softmax: ``spans[i]`` (character offsets,
    :data:`NULL_SPAN` for the null answer) with its logit ``logits[i]``, best first."""

    spans: list[tuple[int, int]]
    logits: list[float]
    null_score: float
    best_span_score: float  # -inf when there is no valid span
    no_answer_probability: float
    copies: tuple[tuple[tuple[int, int], ...], ...] = ()  # per candidate, the spans merged into it (merge_same_answers)

    def scores(self, config: QAConfig | None = None) -> np.ndarray:
        """The candidates' ``score``: the softmax of their logits, through ``config``'s calibration."""
        return calibrated_scores(_softmax(np.asarray(self.logits, dtype=np.float64)), config)


def calibrated_scores(probabilities: np.ndarray, config: QAConfig | None) -> np.ndarray:
    """Softmax scores mapped through ``config.score_calibration`` (unchanged without one)."""
    if config is None or not config.score_calibration:
        return probabilities
    xs, ys = zip(*config.score_calibration)
    return np.interp(probabilities, xs, ys)


def rank_candidates(
    start_logits: np.ndarray, end_logits: np.ndarray, offsets: np.ndarray, config: QAConfig
) -> Candidates:
    """The distinct candidate spans of one example over all of its windows, ranked, with the null
    candidate placed among them when ``config.version_2_with_negative`` (see the module docstring).

    ``start_logits``/``end_logits`` have shape ``(windows, tokens)`` with the [CLS] token at index 0;
    ``offsets`` has shape ``(windows, tokens, 2)`` with ``-1`` for tokens outside the context.
    """
    start_logits = np.asarray(start_logits, dtype=np.float32).reshape(-1, np.shape(start_logits)[-1])
    end_logits = np.asarray(end_logits, dtype=np.float32).reshape(start_logits.shape)
    offsets = np.asarray(offsets).reshape(*start_logits.shape, 2)
    null_score = float(np.min(start_logits[:, 0].astype(np.float64) + end_logits[:, 0]))
    is_context = offsets[..., 0] >= 0
    start_logits = np.where(is_context, start_logits, -np.inf)
    end_logits = np.where(is_context, end_logits, -np.inf)

    n = min(config.n_best, start_logits.shape[1])
    windows = np.arange(start_logits.shape[0])[:, None, None]
    best_starts = np.argsort(-start_logits, axis=1, kind="stable")[:, :n][:, :, None]  # (W, n, 1)
    best_ends = np.argsort(-end_logits, axis=1, kind="stable")[:, :n][:, None, :]  # (W, 1, n)
    scores = start_logits[windows, best_starts] + end_logits[windows, best_ends]  # (W, n, n)
    lengths = best_ends - best_starts + 1
    valid = np.isfinite(scores) & (lengths >= 1) & (lengths <= config.max_answer_length)

    window_idx, start_idx, end_idx = np.broadcast_arrays(windows, best_starts, best_ends)
    window_idx, start_idx, end_idx, scores = (a[valid] for a in (window_idx, start_idx, end_idx, scores))
    char_starts = offsets[window_idx, start_idx, 0]
    char_ends = offsets[window_idx, end_idx, 1]

    # The distinct candidate spans, best first; a span seen in several windows keeps its best sum.
    spans, span_scores, seen = [], [], set()
    for i in np.argsort(-scores, kind="stable"):
        span = (int(char_starts[i]), int(char_ends[i]))
        if span not in seen:
            seen.add(span)
            spans.append(span)
            span_scores.append(float(scores[i]))
    best_span_score = span_scores[0] if spans else -math.inf
    p_no_answer = no_answer_probability(null_score, best_span_score, config)
    abstains = config.version_2_with_negative and p_no_answer > config.no_answer_threshold
    if config.version_2_with_negative and (spans or abstains):
        null_logit = _null_rank_logit(null_score, best_span_score, config, abstains)
        if null_logit > -math.inf:
            # After the spans it beats none of (ties go to the spans unless it abstains).
            place = 0 if abstains else next((i for i, s in enumerate(span_scores) if s < null_logit), len(spans))
            spans.insert(place, NULL_SPAN)
            span_scores.insert(place, null_logit)
    return Candidates(spans, span_scores, null_score, best_span_score, p_no_answer)


def merge_same_answers(candidates: Candidates, texts: Sequence[str]) -> tuple[Candidates, list[str]]:
    """``candidates`` with the spans that read as one answer (their ``texts`` equal once normalised as
    SQuAD scores them) merged into one candidate, and the merged candidates' texts.

    A merged answer is its best span, with the other spans in ``copies``, and the logit
    ``log(sum(exp(logit)))`` of all of them, so its share of the softmax is the sum of theirs: the
    same answer found in three of the passages read is as likely as its three spans together, where
    a lone span in a distractor passage has only its own share (evidence aggregation over passages,
    Wang et al. 2018, "Evidence Aggregation for Answer Re-Ranking in Open-Domain Question Answering").
    The merged candidates are ranked by that logit, except that the null answer stays first when it
    is first (the model abstains: :func:`rank_candidates`' rule decides that, not the merged shares),
    its logit then raised to the best merged one's where that is higher, as :func:`rank_candidates`
    raises it to the best span's, so that scores never increase with rank.
    The null answer merges with nothing, and neither do ``no_answer_probability`` and the best span's
    score, which stay those of the single spans.
    """
    members: dict[object, list[int]] = {}
    for index, (span, text) in enumerate(zip(candidates.spans, texts)):
        members.setdefault(NULL_SPAN if span == NULL_SPAN else normalize_answer(text), []).append(index)
    groups = list(members.values())  # in the order of each answer's best span
    logits = [float(np.logaddexp.reduce([candidates.logits[i] for i in group])) for group in groups]
    abstains = bool(candidates.spans) and candidates.spans[0] == NULL_SPAN
    if abstains:
        logits[0] = max(logits)
    order = sorted(range(len(groups)), key=lambda g: (not (abstains and g == 0), -logits[g]))
    merged = replace(candidates, spans=[candidates.spans[groups[g][0]] for g in order],
                     logits=[logits[g] for g in order],
                     copies=tuple(tuple(candidates.spans[i] for i in groups[g][1:]) for g in order))
    return merged, [texts[groups[g][0]] for g in order]


def distinct_answers(spans: Sequence[tuple[int, int]], texts: Sequence[str], top_k: int,
                     copies: Sequence[Sequence[tuple[int, int]]] = ()) -> list[int]:
    """Indices of the first ``top_k`` candidates that are different answers, in rank order.

    ``spans`` are character spans in one coordinate system (passages laid end to end never overlap).
    A candidate is skipped when its normalised text equals a kept one's (its span then stands for
    that answer too) or its span overlaps a kept answer's span or one of those stand-ins: in a
    duplicate passage, "Blood clotting, in the body" is the kept "blood clotting" with more around it.
    ``copies[i]``, where given, are more stand-ins of candidate ``i`` (the spans merged into it).
    The null span (:data:`NULL_SPAN`) is its own answer and overlaps nothing.
    """
    kept: list[int] = []
    taken: list[tuple[int, int]] = []  # spans of kept answers and of their copies
    kept_texts: set[str] = set()
    for index, (span, text) in enumerate(zip(spans, texts)):
        if len(kept) == top_k:
            break
        if span != NULL_SPAN:
            if any(span[0] < end and start < span[1] for start, end in taken):
                continue
            taken.append(span)
            key = normalize_answer(text)
            if key in kept_texts:
                continue
            kept_texts.add(key)
            taken.extend(copies[index] if copies else ())
        kept.append(index)
    return kept


def decode_spans(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    offsets: np.ndarray,
    context: str,
    config: QAConfig,
    *,
    top_k: int = 1,
) -> list[dict]:
    """The ``top_k`` best answers of one example from all of its windows (:func:`rank_candidates`).

    ``config`` gives n_best, max_answer_length, the abstention settings and the calibration.
    """
    candidates = rank_candidates(start_logits, end_logits, offsets, config)
    if not candidates.spans:
        return [dict(NO_ANSWER)]
    probabilities = candidates.scores(config)
    texts = [context[start:end] if (start, end) != NULL_SPAN else "" for start, end in candidates.spans]
    return [
        {"answer": texts[i], "score": float(probabilities[i]), "start": candidates.spans[i][0],
         "end": candidates.spans[i][1], "no_answer_probability": candidates.no_answer_probability}
        for i in distinct_answers(candidates.spans, texts, top_k)
    ]


def decode_predictions(
    example_ids: Sequence[str],
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    offsets: np.ndarray,
    contexts: Mapping[str, str],
    config: QAConfig,
) -> dict[str, dict]:
    """Best answer per example from the logits of all features (windows), in any order.

    ``example_ids[i]`` names the example of feature ``i``; ``contexts`` maps every example id to its
    context. Examples without any feature get ``NO_ANSWER``.
    """
    windows_of = defaultdict(list)
    for feature_index, example_id in enumerate(example_ids):
        windows_of[example_id].append(feature_index)
    start_logits, end_logits, offsets = (np.asarray(a) for a in (start_logits, end_logits, offsets))
    predictions = {}
    for example_id, context in contexts.items():
        rows = windows_of.get(example_id)
        if not rows:
            predictions[example_id] = dict(NO_ANSWER)
            continue
        predictions[example_id] = decode_spans(
            start_logits[rows], end_logits[rows], offsets[rows], context, config
        )[0]
    return predictions
