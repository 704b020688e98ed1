"""The training loss: per window (BERT's), or shared over all windows of a question.

**Per window** (the default): each window's start and end are a softmax over that window's
positions, the target the answer's token or [CLS] when the window does not hold it -- what
``BertForQuestionAnswering`` computes. A window that does not hold the answer learns "not in
*this* window", never "this passage rather than that one", so logits of different passages were
never trained to compare; yet decoding ranks spans of all windows by them.

**Shared normalisation** (``--shared-normalization``; Clark & Gardner 2018, "Simple and Effective
Multi-Paragraph Reading Comprehension"): the start (and the end) is one softmax over every
position of every window of the question -- all its passages, as ``python -m library_job mine``
groups them -- so the logits of different windows are trained on one scale, the scale
:func:`qa_common.passage_decoding.decode_passages` compares them on. The targets:

- a question that some window answers: the answer's position in *every* window that holds it
  (an overlap of two windows, the same words in two passages), as one target whose probability
  is their sum;
- a question that no window answers (the passages read do not hold it): the [CLS] of every
  window, each with weight ``1 / windows``. Decoding's null score is the *least* [CLS] score over
  the windows, so every window must learn to point there, not just one.

Padding never takes probability. Loss: the mean over questions of (start + end) / 2, as BERT's.
"""

from __future__ import annotations

import collections
import math

import torch


def model_loss(model, batch: dict) -> torch.Tensor:
    """The batch's loss: shared over the windows of each ``group`` when the batch has that column."""
    if "group" not in batch:
        return model(**batch).loss
    inputs = {name: value for name, value in batch.items()
              if name not in ("group", "start_positions", "end_positions")}
    outputs = model(**inputs)
    mask = batch["attention_mask"].bool()
    return (shared_loss(outputs.start_logits, batch["start_positions"], batch["group"], mask)
            + shared_loss(outputs.end_logits, batch["end_positions"], batch["group"], mask)) / 2


def shared_loss(logits: torch.Tensor, positions: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of one softmax per group over all positions of its windows (see the module docstring).

    ``logits`` [windows, length]; ``positions`` [windows]: the answer's token in that window, 0
    ([CLS]) when the window does not hold it; ``groups`` [windows]: any integer id per question;
    ``mask`` [windows, length]: real tokens.
    """
    logits = logits.float().masked_fill(~mask, float("-inf"))
    _, group = torch.unique(groups, return_inverse=True)
    count = int(group.max()) + 1
    log_normaliser = _segment_logsumexp(torch.logsumexp(logits, dim=1), group, count)
    chosen = logits.gather(1, positions.long()[:, None]).squeeze(1)  # the target's logit in each window
    holds = positions > 0
    answered = torch.zeros(count, device=logits.device).index_add(0, group, holds.float()) > 0
    # Answered groups: log of the summed probability of their answer positions.
    answer_log = _segment_logsumexp(chosen.masked_fill(~holds, float("-inf")), group, count)
    # Unanswered groups: the mean log probability of their windows' [CLS].
    windows = torch.zeros(count, device=logits.device).index_add(0, group, torch.ones_like(chosen))
    null_log = torch.zeros(count, device=logits.device).index_add(0, group, chosen) / windows
    target = torch.where(answered, answer_log, null_log)
    return (log_normaliser - target).mean()


def _segment_logsumexp(values: torch.Tensor, group: torch.Tensor, count: int) -> torch.Tensor:
    """log-sum-exp of ``values`` per group id (a group of only -inf gives a finite floor, never NaN)."""
    top = torch.full((count,), float("-inf"), device=values.device).scatter_reduce(0, group, values, "amax").detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    sums = torch.zeros(count, device=values.device).index_add(0, group, torch.exp(values - top[group]))
    return torch.log(sums.clamp_min(torch.finfo(sums.dtype).tiny)) + top


def micro_batches(batch: dict, max_tokens: int | None) -> list[tuple[dict, float]]:
    """``batch`` cut into parts of at most ``max_tokens`` tokens (rows x the batch's padded length) each,
    with each part's share of the batch's loss, for accumulating gradients over the parts.

    The loss is a mean over windows (per window) or over questions (shared normalisation), so a
    part's share is its windows' or its questions' share of the batch's, and the shares' weighted
    losses sum to the batch's loss: the same gradients, only the dropout masks drawn part by part.
    A question's windows stay in one part (its softmax spans all of them); one whose windows alone
    hold more than ``max_tokens`` is a part of its own. Parts are of even size rather than full ones
    and a small remainder, whose matmuls would run slower per token. Without ``max_tokens``, or a
    batch within it: the batch itself.
    """
    rows, length = batch["input_ids"].shape
    if not max_tokens or rows * length <= max_tokens:
        return [(batch, 1.0)]
    per_part = max(1, max_tokens // length)  # rows a part may hold
    if "group" not in batch:
        parts = math.ceil(rows / per_part)
        bounds = [rows * i // parts for i in range(parts + 1)]
        return [({name: value[start:end] for name, value in batch.items()}, (end - start) / rows)
                for start, end in zip(bounds, bounds[1:])]
    ids = batch["group"].tolist()
    sizes = collections.Counter(ids)  # windows per question, in the order of their first window
    target = math.ceil(rows / math.ceil(rows / per_part))  # the rows of even parts
    packed, current, filled = [], [], 0
    for question, size in sizes.items():  # close a part before the question that would overflow it
        if current and filled + size > target:
            packed.append(current)
            current, filled = [], 0
        current.append(question)
        filled += size
    packed.append(current)
    parts = []
    for questions in map(set, packed):
        rows_of = torch.tensor([row for row, question in enumerate(ids) if question in questions],
                               device=batch["group"].device)
        parts.append(({name: value[rows_of] for name, value in batch.items()}, len(questions) / len(sizes)))
    return parts
