"""Turn start/end logits back into answer text: the n-best span search.

Our answer format everywhere (evaluation, serving, the CLI) is::

    {"answer": str, "score": float, "start": int, "end": int}

with ``context[start:end] == answer``. Candidate spans are ranked by ``start_logit + end_logit``,
the ranking of the BERT paper and of Hugging Face's ``utils_qa.py``. Edge cases, all handled here:

- tokens outside the context (question, [CLS], [SEP], padding) have offsets ``(-1, -1)`` and are
  never a start or an end;
- spans with ``end < start`` or longer than ``max_answer_length`` tokens are invalid;
- an example split into several windows is decoded over all of them; the same character span seen
  in two overlapping windows counts once, with its best score;
- when no valid span exists the answer is empty: ``{"answer": "", "score": 0.0, "start": 0, "end": 0}``.

``score`` is a probability: softmax of the start logits times softmax of the end logits over the
context tokens of the span's window (what the old ``transformers`` QA pipeline reported).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from qa_common.config import QAConfig

NO_ANSWER = {"answer": "", "score": 0.0, "start": 0, "end": 0}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    finite_max = np.max(np.where(np.isfinite(logits), logits, -np.inf), axis=-1, keepdims=True)
    shifted = logits - np.where(np.isfinite(finite_max), finite_max, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):  # a window with no context token: all -inf
        return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def decode_spans(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    offsets: np.ndarray,
    context: str,
    config: QAConfig,
    *,
    top_k: int = 1,
) -> list[dict]:
    """The ``top_k`` best answers of one example from all of its windows (``config``: n_best, max_answer_length).

    ``start_logits``/``end_logits`` have shape ``(windows, tokens)``; ``offsets`` has shape
    ``(windows, tokens, 2)`` with ``-1`` for tokens outside the context.
    """
    start_logits = np.asarray(start_logits, dtype=np.float32).reshape(-1, np.shape(start_logits)[-1])
    end_logits = np.asarray(end_logits, dtype=np.float32).reshape(start_logits.shape)
    offsets = np.asarray(offsets).reshape(*start_logits.shape, 2)
    is_context = offsets[..., 0] >= 0
    start_logits = np.where(is_context, start_logits, -np.inf)
    end_logits = np.where(is_context, end_logits, -np.inf)
    start_log_probs, end_log_probs = _log_softmax(start_logits), _log_softmax(end_logits)

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
    probabilities = np.exp(start_log_probs[window_idx, start_idx] + end_log_probs[window_idx, end_idx])

    answers, seen = [], set()
    for i in np.argsort(-scores, kind="stable"):
        span = (int(char_starts[i]), int(char_ends[i]))
        if span in seen:
            continue
        seen.add(span)
        answers.append(
            {"answer": context[span[0] : span[1]], "score": float(probabilities[i]), "start": span[0], "end": span[1]}
        )
        if len(answers) == top_k:
            break
    return answers or [dict(NO_ANSWER)]


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
    context. Examples without any feature get the empty answer.
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
