"""Sliding-window tokenisation of (question, context) pairs into model features.

A context longer than one window is split into overlapping windows (``max_length`` tokens each,
consecutive windows sharing ``stride`` tokens, only the context is truncated). Every window is a
*feature*; one example can give several.

Training features carry ``start_positions``/``end_positions``: the token span of the answer, or
``(0, 0)`` (the [CLS] token) when the answer is not wholly inside that window or the question has
no answer (SQuAD 2.0: an empty answer text).

Evaluation features carry ``example_id`` and ``offset_mapping``: per token the ``(start, end)``
character span in the context, or ``(-1, -1)`` for tokens that are not context (question, special,
padding) so decoding can never pick them. We use -1 rather than ``None`` because Arrow (Ray Data,
``datasets``) turns ``None`` inside nested lists into empty lists.

Every array is padded to ``max_length`` so features stack into fixed-shape tensors; the training
loop trims the padding per batch (:func:`trim_padding`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qa_common.config import QAConfig

# The token columns a BERT QA model reads, in its forward's order (an ONNX export's inputs keep it).
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class UnsupportedTokenizerError(ValueError):
    """The tokenizer breaks an assumption of the windowing (right padding, room for the context)."""


def check_tokenizer(tokenizer, config: QAConfig) -> None:
    """Raise UnsupportedTokenizerError unless the windows below work with ``tokenizer``.

    They need right padding (features are trimmed from the right, the question comes first) and
    room for more than ``stride`` context tokens once the question and the special tokens the
    tokenizer adds to a pair are in (QAConfig checks BERT's 3; RoBERTa-style tokenizers add 4).
    """
    name = f"{type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '') or 'unnamed'})"
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise UnsupportedTokenizerError(
            f"tokenizer {name} pads on the {tokenizer.padding_side}; QA windows need right padding"
        )
    special = tokenizer.num_special_tokens_to_add(pair=True)
    context_room = config.max_length - config.max_question_length - special
    if context_room <= config.stride:
        raise UnsupportedTokenizerError(
            f"tokenizer {name} adds {special} special tokens to a question-context pair, leaving {context_room} "
            f"context tokens per window (max_length {config.max_length} - max_question_length "
            f"{config.max_question_length} - {special}), which must exceed stride {config.stride}; lower stride or "
            "max_question_length, or raise max_length"
        )


def truncate_questions(questions: Sequence[str], tokenizer, max_question_length: int) -> list[str]:
    """Strip leading spaces and cut questions to at most ``max_question_length`` tokens.

    A question that fills the window leaves no room for the context, and ``only_second`` truncation
    then fails for the whole batch; cutting the rare very long question keeps the batch alive. Every
    question is measured in tokens: a byte-level BPE can turn a short string into many tokens.
    """
    questions = [question.lstrip() for question in questions]
    if not questions:
        return questions
    encoded = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    for i, offsets in enumerate(encoded["offset_mapping"]):
        if len(offsets) > max_question_length:
            questions[i] = questions[i][: offsets[max_question_length - 1][1]]
    return questions


def tokenize_windows(tokenizer, questions: Sequence[str], contexts: Sequence[str], config: QAConfig):
    """Tokenise pairs into windows; returns the tokenizer's BatchEncoding and the context-token mask."""
    check_tokenizer(tokenizer, config)
    encoding = tokenizer(
        truncate_questions(questions, tokenizer, config.max_question_length),
        list(contexts),
        truncation="only_second",
        max_length=config.max_length,
        stride=config.stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )
    # sequence_ids is 0 for question tokens, 1 for context tokens, None for special and padding
    # tokens; numpy turns None into NaN, which compares unequal to 1.
    sequence_ids = np.array([e.sequence_ids for e in encoding.encodings], dtype=np.float32)
    return encoding, sequence_ids == 1


def count_windows(tokenizer, questions: Sequence[str], contexts: Sequence[str], config: QAConfig) -> list[int]:
    """How many windows :func:`tokenize_windows` makes of each (question, context) pair, without making them.

    Tokenises each side once (no padding, no offsets) and applies the sliding window's arithmetic:
    a window holds ``max_length - question tokens - special tokens`` context tokens (the tokenizer's
    own count for a pair: 3 for BERT, 4 for RoBERTa) and consecutive windows share ``stride`` of
    them. Cheap enough to bound a request's work before it reaches the model.
    """
    questions = truncate_questions(questions, tokenizer, config.max_question_length)
    question_tokens = tokenizer(questions, add_special_tokens=False, verbose=False)["input_ids"]
    context_tokens = tokenizer(list(contexts), add_special_tokens=False, verbose=False)["input_ids"]
    special, counts = tokenizer.num_special_tokens_to_add(pair=True), []
    for question, context in zip(question_tokens, context_tokens):
        room = config.max_length - len(question) - special
        overflow = len(context) - room
        counts.append(1 if overflow <= 0 else 1 + -(-overflow // (room - config.stride)))
    return counts


def _model_inputs(encoding, tokenizer) -> dict[str, np.ndarray]:
    return {
        name: np.asarray(encoding[name], dtype=np.int32)
        for name in tokenizer.model_input_names
        if name in encoding
    }


def prepare_train_features(
    questions: Sequence[str],
    contexts: Sequence[str],
    answer_starts: Sequence[int],
    answer_texts: Sequence[str],
    tokenizer,
    config: QAConfig,
    groups: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Training features with answer-span labels (one answer per example, as in SQuAD train).

    An unanswerable question has answer text ``""`` (its answer start is ignored). With ``groups``
    (an integer per example) every window also carries its example's ``group``.
    """
    encoding, is_context = tokenize_windows(tokenizer, questions, contexts, config)
    sample = np.asarray(encoding["overflow_to_sample_mapping"])
    offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64)
    token_starts, token_ends = offsets[..., 0], offsets[..., 1]
    answer_start_chars = np.asarray(answer_starts, dtype=np.int64)[sample]
    answer_lengths = np.array([len(t) for t in answer_texts], dtype=np.int64)[sample]
    answer_end_chars = answer_start_chars + answer_lengths

    positions = np.arange(is_context.shape[1])
    first_context = np.argmax(is_context, axis=1)
    last_context = is_context.shape[1] - 1 - np.argmax(is_context[:, ::-1], axis=1)
    rows = np.arange(len(sample))
    inside = (answer_lengths > 0) & (token_starts[rows, first_context] <= answer_start_chars) & (
        token_ends[rows, last_context] >= answer_end_chars
    )
    # Start: the last context token starting at or before the answer's first character.
    # End: the first context token ending at or after the answer's last character.
    # Context offsets increase along the window, so both are well defined when `inside`.
    starts_before = is_context & (token_starts <= answer_start_chars[:, None])
    start_positions = np.max(np.where(starts_before, positions, -1), axis=1)
    ends_after = is_context & (token_ends >= answer_end_chars[:, None])
    end_positions = np.min(np.where(ends_after, positions, is_context.shape[1]), axis=1)

    features = _model_inputs(encoding, tokenizer)
    features["start_positions"] = np.where(inside, start_positions, 0).astype(np.int32)
    features["end_positions"] = np.where(inside, end_positions, 0).astype(np.int32)
    if groups is not None:
        features["group"] = np.asarray(groups, dtype=np.int64)[sample]
    return features


def prepare_eval_features(
    example_ids: Sequence[str],
    questions: Sequence[str],
    contexts: Sequence[str],
    tokenizer,
    config: QAConfig,
) -> dict[str, np.ndarray]:
    """Evaluation/inference features: model inputs, ``example_id`` and context-masked offsets."""
    encoding, is_context = tokenize_windows(tokenizer, questions, contexts, config)
    sample = np.asarray(encoding["overflow_to_sample_mapping"])
    offsets = np.asarray(encoding["offset_mapping"], dtype=np.int32)
    features = _model_inputs(encoding, tokenizer)
    features["example_id"] = np.asarray(example_ids, dtype=object)[sample]
    features["offset_mapping"] = np.where(is_context[..., None], offsets, -1).astype(np.int32)
    return features


# PyTorch on a CPU computes batches cut to a multiple of this many tokens: a few tensor shapes instead of
# one per length. glibc's heap reuses freed blocks across few shapes, while a new, longer shape every
# batch leaves the freed ones behind: a training epoch grew to 6-8 GB, an evaluation pass over 3,000
# questions from 0.6 to 3.5-3.9 GB, and to 1.4 GB in buckets (BENCHMARKS.md, "Training near the
# machine's limit").
LENGTH_MULTIPLE = 32


def trim_padding(batch: dict, length_key: str = "attention_mask", multiple_of: int = 1) -> dict:
    """Cut a batch of padded features to its longest real sequence (saves attention work), rounded up
    to ``multiple_of`` tokens (never past the features' width): a few shapes instead of one per length."""
    width = batch[length_key].shape[1]
    longest = min(width, -(-int(batch[length_key].sum(axis=1).max()) // multiple_of) * multiple_of)
    return {
        name: value[:, :longest] if getattr(value, "ndim", 0) >= 2 else value
        for name, value in batch.items()
    }


def length_grouped_batches(big_batches, batch_size: int, rng: np.random.Generator, length_key: str = "attention_mask"):
    """Re-cut large batches into ``batch_size`` batches of similar length, in random order.

    Each large batch (say 32 batches' worth of shuffled features) is sorted by real length and cut
    into batches, so :func:`trim_padding` removes most of the padding; shuffling the order of the
    batches keeps the short ones and the long ones interleaved across steps.
    """
    for big in big_batches:
        order = np.argsort(np.asarray(big[length_key]).sum(axis=1), kind="stable")
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        for chunk_index in rng.permutation(len(chunks)):
            yield {name: values[chunks[chunk_index]] for name, values in big.items()}
