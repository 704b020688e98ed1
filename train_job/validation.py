"""The validation pass after each epoch: each worker decodes its share of the questions, every worker
gets the same metrics."""

from __future__ import annotations

import torch

from qa_common import NO_ANSWER, decode_predictions, evaluate_answers, predict_logits
from train_job.collectives import gather_objects
from train_job.config import TrainConfig


def my_questions(validation_features: dict, rank: int, world_size: int) -> dict:
    """The validation windows worker ``rank`` evaluates: every ``world_size``-th question's, all its windows."""
    mine = validation_features["example_index"] % world_size == rank
    return {name: values[mine] for name, values in validation_features.items()}


def evaluate(model: torch.nn.Module, config: TrainConfig, autocast: torch.autocast, validation_features: dict,
             validation_records: list[dict], rank: int, world_size: int):
    """The metrics over every validation question (:func:`qa_common.evaluate_answers`); each worker
    decodes its share of the questions (:func:`my_questions`).

    All windows of one question go to the same worker, which decodes them together (the best span
    and its no-answer probability); the answers are then gathered and every worker computes the
    same metrics: SQuAD 1.1's, or SQuAD 2.0's (with the chosen no-answer threshold) for v2 data or
    a model that abstains. The forwards go through the unwrapped model: DDP's forward is a
    collective (it broadcasts buffers), and workers run different numbers of evaluation forwards.
    """
    model = getattr(model, "module", model)
    model.eval()
    contexts = {i: validation_records[i]["context"] for i in range(rank, len(validation_records), world_size)}
    if len(validation_features["example_index"]):
        with autocast:
            start_logits, end_logits = predict_logits(model, validation_features, batch_size=config.eval_batch_size)
        # The best span even where the model would abstain: the threshold is chosen afterwards.
        decoded = decode_predictions(
            validation_features["example_index"], start_logits, end_logits, validation_features["offset_mapping"],
            contexts, config.qa.replace(version_2_with_negative=False),
        )
    else:
        decoded = {i: dict(NO_ANSWER) for i in contexts}
    answers = {validation_records[i]["id"]: answer for i, answer in decoded.items()}
    answers = {k: v for part in gather_objects(answers, world_size) for k, v in part.items()}
    references = {record["id"]: record["answers"]["text"] for record in validation_records}
    return evaluate_answers(answers, references, version_2_with_negative=config.qa.version_2_with_negative)


def describe_scores(scores: dict) -> str:
    if "HasAns_f1" in scores or "NoAns_f1" in scores:
        parts = [f"EM {scores['exact']:.2f}, F1 {scores['f1']:.2f}"]
        parts += [f"{split} F1 {scores[split + '_f1']:.2f}" for split in ("HasAns", "NoAns") if split + "_f1" in scores]
        if "no_answer_threshold" in scores:
            parts.append(f"no-answer threshold {scores['no_answer_threshold']:.3f}")
        return ", ".join(parts)
    return f"EM {scores['exact_match']:.2f}, F1 {scores['f1']:.2f}"
