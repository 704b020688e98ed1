"""Decode one question read over several passages (a library's top-k retrievals) as one candidate set.

The passages are laid end to end, one character apart, so that a window's offsets stay unique and no
span crosses from one passage into the next; :mod:`qa_common.decoding` then ranks every passage's
spans together, the spans that read as one answer are merged into it, and each answer is mapped back
to its passage. The search's order enters as a log prior on each passage's spans (:func:`with_rank_prior`).
:func:`passage_relevance` ranks the passages read by what the reader found in each (:func:`passage_order`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qa_common.confidence import confidence_scores
from qa_common.config import QAConfig
from qa_common.decoding import (NO_ANSWER, NULL_SPAN, Candidates, calibrated_scores, distinct_answers, merge_same_answers,
                                rank_candidates)

PASSAGE_SEPARATOR = "\n"  # between passages read as one candidate set: no answer span crosses it


def passages_laid_end_to_end(offsets: np.ndarray, window_passages: Sequence[int],
                             passages: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(bases, offsets)``: where each passage starts when ``passages`` are laid end to end one
    character apart (``PASSAGE_SEPARATOR.join(passages)``), and each window's offsets moved there."""
    lengths = np.array([len(passage) + len(PASSAGE_SEPARATOR) for passage in passages], dtype=np.int64)
    bases = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    offsets = np.asarray(offsets, dtype=np.int64)
    shift = bases[np.asarray(window_passages, dtype=np.int64)][:, None, None]
    return bases, np.where(offsets >= 0, offsets + shift, offsets)


def with_rank_prior(start_logits: np.ndarray, window_passages: Sequence[int], weight: float) -> np.ndarray:
    """``start_logits`` with every token of window ``i`` but [CLS] lowered by ``weight * ln(r)``, ``r``
    the 1-based search rank of its passage (``window_passages[i] + 1``).

    Each span's logit sum drops by the same amount, a log prior on the search's order: the reader
    alone never sees that the search put a passage fifth, and a distractor it reads as confidently
    as the first passage is more often wrong (on open-domain SQuAD, ACCURACY.md). [CLS], the null
    answer, keeps its logit, so the prior also makes "not in these passages" likelier when the best
    span is in a passage ranked low. ``weight`` 0: unchanged.
    """
    if not weight:
        return start_logits
    shifted = np.array(start_logits, dtype=np.float32)
    shifted[:, 1:] -= (weight * np.log1p(np.asarray(window_passages, dtype=np.float64)))[:, None].astype(np.float32)
    return shifted


def passage_relevance(start_logits: np.ndarray, end_logits: np.ndarray, offsets: np.ndarray,
                      window_passages: Sequence[int], passages: int) -> np.ndarray:
    """Per passage read, how strongly the reader finds an answer in it: over the passage's windows,
    the best start logit plus the best end logit among its context tokens, less the window's null
    answer ([CLS] start + end). ``-inf`` for a passage with no window.

    The reader as a re-ranker of the search's passages (it reads each with the question, as a
    cross-encoder does; Nogueira & Cho 2019, arXiv 1901.04085), at no cost beyond the reading. The
    best start and end are taken apart (not the best valid span) and the search's order is not in
    it: on open-domain SQuAD dev, this order of the eight passages read puts the question's
    paragraph first for 0.86-0.88 of the questions, against the search's 0.81 (ACCURACY.md).
    Decoding keeps the search's order for its prior: read in this order, F1 fell by a point.
    """
    context = np.asarray(offsets)[:, :, 0] >= 0  # question and special tokens carry offset -1
    best = (np.where(context, start_logits, -np.inf).max(axis=1) + np.where(context, end_logits, -np.inf).max(axis=1)
            - np.asarray(start_logits)[:, 0] - np.asarray(end_logits)[:, 0])
    relevance = np.full(passages, -np.inf)
    np.maximum.at(relevance, np.asarray(window_passages, dtype=np.int64), best)
    return relevance


def passage_order(start_logits: np.ndarray, end_logits: np.ndarray, offsets: np.ndarray,
                  window_passages: Sequence[int], passages: int) -> list[int]:
    """The indices of the ``passages`` read, the one of highest :func:`passage_relevance` first (ties
    in the search's order)."""
    relevance = passage_relevance(start_logits, end_logits, offsets, window_passages, passages)
    return np.argsort(-relevance, kind="stable").tolist()


def passage_candidates(start_logits: np.ndarray, end_logits: np.ndarray, joined_offsets: np.ndarray, context: str,
                       config: QAConfig) -> tuple[Candidates, list[str]]:
    """One question's ranked answers over its passages laid end to end (``context``, the offsets moved
    there by :func:`passages_laid_end_to_end`) and their texts: :func:`rank_candidates`, then the spans
    that read as one answer merged into it (:func:`merge_same_answers`). ``config`` as it is used."""
    candidates = rank_candidates(start_logits, end_logits, joined_offsets, config)
    texts = [context[start:end] if (start, end) != NULL_SPAN else "" for start, end in candidates.spans]
    return merge_same_answers(candidates, texts)


def decode_passages(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    offsets: np.ndarray,
    window_passages: Sequence[int],
    passages: Sequence[str],
    config: QAConfig,
    *,
    top_k: int = 1,
) -> list[dict]:
    """The ``top_k`` best answers of one question read over several passages as one candidate set.

    Window ``i`` is a window of ``passages[window_passages[i]]`` (its offsets into that passage).
    The passages are laid end to end (one character apart, so no span crosses from one into the
    next) and decoded as one example (:func:`passage_candidates`): the score's softmax spans every
    passage's candidates, so scores compare across passages and documents; an answer found in
    several passages (or twice in one) is one answer with their shares summed; and the null score
    is the minimum over all their windows, so the answer is "not in these passages" only when no
    passage draws the model away from [CLS]. Each answer adds ``passage``, the index of its passage
    (-1 for the null answer), with ``start``/``end`` into that passage's text: where the answer was
    found several times, its best span's. The threshold and calibration are
    ``config.over_passages()``: those fitted over a library's retrievals where the model has them,
    and so is the weight of the search's order (:func:`with_rank_prior`): ``passages`` come best
    first, as the search ranked them. Where that fit found one, the score is the calibrated
    probability of a logistic model of what is known of the answer (:mod:`qa_common.confidence`) in
    place of its share of the softmax.
    """
    config = config.over_passages()
    start_logits = with_rank_prior(start_logits, window_passages, config.passage_rank_weight)
    bases, joined_offsets = passages_laid_end_to_end(offsets, window_passages, passages)
    candidates, texts = passage_candidates(start_logits, end_logits, joined_offsets,
                                           PASSAGE_SEPARATOR.join(passages), config)
    if not candidates.spans:
        return [{**NO_ANSWER, "passage": -1}]
    shown = distinct_answers(candidates.spans, texts, top_k, candidates.copies)
    starts = np.array([candidates.spans[i][0] for i in shown], dtype=np.int64)
    of_passage = np.where(starts >= 0, np.searchsorted(bases, starts, side="right") - 1, -1).tolist()
    located = [(p, NULL_SPAN if p < 0 else (start - int(bases[p]), end - int(bases[p])))
               for p, (start, end) in zip(of_passage, (candidates.spans[i] for i in shown))]  # (passage, span in it)
    probabilities = calibrated_scores(confidence_scores(candidates, texts, bases, shown, config.answer_confidence),
                                      config) if config.answer_confidence else candidates.scores(config)[shown]
    return [
        {"answer": texts[i], "score": float(score), "start": span[0], "end": span[1],
         "no_answer_probability": candidates.no_answer_probability, "passage": passage}
        for i, score, (passage, span) in zip(shown, probabilities, located)
    ]
