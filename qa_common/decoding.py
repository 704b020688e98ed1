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
  ``{"answer": "", "score": 0.0, "start": 0, "end": 0, "no_answer_probability": 1.0}``.

**score.** A probability over the whole question: the softmax of the logit sums of every distinct
valid candidate span (the ``n_best`` starts x ``n_best`` ends of each window, from all windows), plus
the null candidate when abstention is on. The top
answer therefore has the highest score, the scores of the ``top_k`` answers never increase with
rank, and they sum to at most 1.

**The null answer ("not in this document", SQuAD 2.0).** As in Hugging Face's ``run_qa.py
--version_2_with_negative``: the null score is the [CLS] token's start + end logit, the *minimum*
over the question's windows (a window that does not hold the answer points at [CLS] whether or not
another window holds it, so the most telling window is the one least drawn to [CLS]). Every answer
carries::

    no_answer_probability = sigmoid(null_score - best_span_score)

the probability of "no answer" against the best span. With ``config.version_2_with_negative`` the
answer is the null answer ``{"answer": "", "score": p_null, "start": -1, "end": -1, ...}`` exactly
when ``no_answer_probability > config.no_answer_threshold`` -- the official SQuAD 2.0 evaluation's
``na_prob > na_prob_thresh`` rule, and Hugging Face's ``null_score - best_span_score >
null_score_diff_threshold`` with ``null_score_diff_threshold = log(t / (1 - t))`` for threshold
``t`` (so ``t = 0.5`` is HF's default 0.0). Among the ranked answers the null candidate competes
with the logit ``null_score - log(t / (1 - t))``, which puts it first exactly when it is the
answer; ``p_null`` is its share of the softmax. ``t = 1`` never abstains.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from qa_common.config import QAConfig

NO_ANSWER = {"answer": "", "score": 0.0, "start": 0, "end": 0, "no_answer_probability": 1.0}
NULL_SPAN = (-1, -1)  # start and end of the null answer


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax of a 1-d float64 array that may hold -inf (probability 0) and +inf (sharing all of it)."""
    top = np.max(logits)
    if np.isposinf(top):
        return np.isposinf(logits) / np.count_nonzero(np.isposinf(logits))
    weights = np.exp(logits - top)
    return weights / weights.sum()


def no_answer_probability(null_score: float, best_span_score: float) -> float:
    """``sigmoid(null_score - best_span_score)``: 1.0 when there is no valid span."""
    difference = null_score - best_span_score
    if difference >= 0:
        return 1.0 / (1.0 + math.exp(-difference))
    return math.exp(difference) / (1.0 + math.exp(difference))


def _null_rank_logit(null_score: float, best_span_score: float, config: QAConfig, abstains: bool) -> float:
    """The logit the null candidate competes with: ``null_score - log(t / (1 - t))``.

    Clamped against the best span so that the null candidate ranks first exactly when the
    probability rule abstains (the two differ by rounding only at the threshold itself).
    """
    t = config.no_answer_threshold
    if t >= 1:
        return -math.inf
    shift = -math.inf if t <= 0 else math.log(t) - math.log1p(-t)
    logit = null_score - shift
    return max(logit, best_span_score) if abstains else min(logit, best_span_score)


def decode_spans(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    offsets: np.ndarray,
    context: str,
    config: QAConfig,
    *,
    top_k: int = 1,
) -> list[dict]:
    """The ``top_k`` best answers of one example from all of its windows.

    ``config`` gives n_best, max_answer_length and the abstention settings. ``start_logits``/
    ``end_logits`` have shape ``(windows, tokens)`` with the [CLS] token at index 0; ``offsets`` has
    shape ``(windows, tokens, 2)`` with ``-1`` for tokens outside the context.
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
    p_no_answer = no_answer_probability(null_score, best_span_score)
    abstains = config.version_2_with_negative and p_no_answer > config.no_answer_threshold
    if not spans and not abstains:
        return [dict(NO_ANSWER)]

    if config.version_2_with_negative:
        null_logit = _null_rank_logit(null_score, best_span_score, config, abstains)
        if null_logit > -math.inf:
            # After the spans it beats none of (ties go to the spans unless it abstains).
            place = 0 if abstains else next((i for i, s in enumerate(span_scores) if s < null_logit), len(spans))
            spans.insert(place, NULL_SPAN)
            span_scores.insert(place, null_logit)
    probabilities = _softmax(np.asarray(span_scores, dtype=np.float64))
    return [
        {"answer": context[start:end] if (start, end) != NULL_SPAN else "", "score": float(probability),
         "start": start, "end": end, "no_answer_probability": p_no_answer}
        for (start, end), probability in zip(spans[:top_k], probabilities[:top_k])
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
