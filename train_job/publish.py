"""Publish a run: its best checkpoint as a Hugging Face model directory with metrics, calibration and a
model card (and, when asked, on the Hub)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qa_common import QAConfig, load_model_and_tokenizer, save_qa_config
from qa_common.calibration import calibrate
from qa_common.calibration import describe as describe_calibration
from train_job import run_dir
from train_job.checkpoint import copy_model_and_predictions, read_train_config
from train_job.config import TrainConfig

METRIC_NAMES = ("exact_match", "f1", "precision", "recall")  # SQuAD 1.1
V2_METRIC_NAMES = (  # SQuAD 2.0 (the official script's names), and the threshold the export stores
    "exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total", "NoAns_exact", "NoAns_f1", "NoAns_total",
    "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh", "no_answer_threshold",
)


def publish_run(checkpoint, checkpoint_metrics: dict, config: TrainConfig, output_dir: Path, extra: dict,
               validation_records: list[dict]) -> dict:
    """Write ``model/`` (+ ``model/README.md``), ``metrics.json`` and ``predictions.json``; return the metrics.

    The metrics and the card describe the model exported: its settings and fingerprint are read from
    the checkpoint. ``qa_config.json`` gets the no-answer threshold evaluation chose and the
    calibration fitted on ``validation_records`` (:mod:`qa_common.calibration`).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    model_dir = output_dir / run_dir.MODEL
    with checkpoint.as_directory() as directory:
        copy_model_and_predictions(directory, model_dir, output_dir / run_dir.PREDICTIONS)
        recorded = read_train_config(directory)
    config = TrainConfig.from_dict(recorded["config"])
    metrics = {
        **{name: checkpoint_metrics[name] for name in (*METRIC_NAMES, *V2_METRIC_NAMES) if name in checkpoint_metrics},
        "train_samples_per_second": checkpoint_metrics["train_samples_per_second"],
        "train_runtime_s": checkpoint_metrics["train_runtime_s"],
        "train_loss": checkpoint_metrics["train_loss"],
        "epochs": config.epochs,
        "best_epoch": checkpoint_metrics["epoch"],
        "learning_rate": config.learning_rate,
        "num_workers": config.num_workers,
        "worker_node_ids": checkpoint_metrics["worker_node_ids"],
        "per_device_batch_size": config.per_device_batch_size,
        "training_precision": checkpoint_metrics["training_precision"],
        "training_dropout": checkpoint_metrics["training_dropout"],
        "gradient_checkpointing": checkpoint_metrics["gradient_checkpointing"],
        "sparse_lookup_gradient": checkpoint_metrics["sparse_lookup_gradient"],
        "allocator": checkpoint_metrics["allocator"],
        "max_batch_tokens": config.max_batch_tokens,
        "model": config.model,
        "dataset": config.dataset or {"train": config.train_file, "validation": config.validation_file},
        "fingerprint": recorded["fingerprint"],
        **extra,
    }
    # Serving decodes as training evaluated, with the no-answer threshold evaluation chose, calibrated.
    qa, metrics["calibration"] = calibrate_export(model_dir, validation_records,
                                                  config.qa.replace(no_answer_threshold=metrics.get("no_answer_threshold")))
    if "no_answer_threshold" in metrics:
        metrics["no_answer_threshold"] = qa.no_answer_threshold  # on the calibrated scale: the same decisions
    print(f"[train_job] calibration: {describe_calibration(metrics['calibration'])}", flush=True)
    save_qa_config(qa, model_dir)
    (output_dir / run_dir.METRICS).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (model_dir / "README.md").write_text(model_card(metrics, config), encoding="utf-8")
    if declines_everything(metrics, config):
        print(f"[train_job] warning: {DECLINES_EVERYTHING}", file=sys.stderr)
    return metrics


def calibrate_export(model_dir: Path, validation_records: list[dict], qa: QAConfig) -> tuple[QAConfig, dict]:
    """The exported model's calibration, fitted on the validation questions (PyTorch fp32, in this process)."""
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    return calibrate(model.eval(), tokenizer, validation_records, qa)


DECLINES_EVERYTHING = (
    "at the no-answer threshold chosen on the validation set this model declines every question: no threshold "
    "scored better than answering nothing, so it has not learnt yet to tell answerable questions from "
    "unanswerable ones. Train it longer or on more data (or with a lower --negative-ratio) and check its "
    "HasAns F1 before serving it"
)


def declines_everything(metrics: dict, config: TrainConfig) -> bool:
    """An abstaining model whose threshold declines every validation question: the official search for
    the best threshold starts at 0, "decline everything", and kept it."""
    return config.qa.version_2_with_negative and metrics.get("no_answer_threshold") == 0.0


def model_card(metrics: dict, config: TrainConfig) -> str:
    source = config.dataset or Path(config.train_file).name
    if config.holdout_questions:
        dataset = f"{source} (train; validation: whole articles held out of it, at least {config.holdout_questions} questions)"
    else:
        dataset = config.dataset or f"{source} (train), {Path(config.validation_file).name} (validation)"
    if config.max_train_samples:
        dataset += f"; {config.max_train_samples} training questions sampled ({config.sample})"
    if config.negative_ratio:
        dataset += (f", plus {config.negative_ratio:g} synthesised unanswerable question(s) per answerable one "
                    f"(paragraphs: {config.negative_source})")
    abstention = (
        "it answers \"not in this document\" only when it is fairly sure; it can still return a wrong span for a "
        "question the passage does not answer, or decline one it does."
        if config.qa.version_2_with_negative else
        "it always returns a span, even when the passage does not answer the question."
    )
    return f"""---
library_name: transformers
pipeline_tag: question-answering
base_model: {config.model}
tags: [question-answering, extractive-qa, squad, ray]
---

# Extractive QA model fine-tuned from `{config.model}`

Fine-tuned with Ray Train ({config.num_workers} worker(s), {metrics['training_precision']}, {metrics['training_dropout']} dropout) by this project's `train_job`.
Given a question and a passage, it returns the span of the passage that answers the question.

## Results

{results_section(metrics, config)}
Best of {config.epochs} epoch(s): epoch {metrics['best_epoch']}.

Calibration, fitted on the same validation questions: {describe_calibration(metrics["calibration"])}. With it,
`score` is the probability that the answer is exactly right, `no_answer_probability` that the passage
does not answer the question.

## Training

- Data: {dataset}; {metrics['train_examples']} training questions ({metrics['train_features']} windows)
- Learning rate {config.learning_rate:g} (linear schedule, warm-up ratio {config.warmup_ratio}), weight decay
  {config.weight_decay}, {config.per_device_batch_size} windows per worker per step, seed {config.seed}
- Windows of {config.qa.max_length} tokens with a stride of {config.qa.stride}; answers of at most
  {config.qa.max_answer_length} tokens
- {metrics['train_samples_per_second']:.1f} training windows/s, {metrics['train_runtime_s']:.0f} s of training

## Use

```python
from qa_common import Question, answer_questions, load_model_and_tokenizer, load_qa_config
model, tokenizer = load_model_and_tokenizer("path/to/this/model")
answer_questions(model, tokenizer, [Question("What is the target INR?", "The target INR is 2 to 3.")],
                 load_qa_config("path/to/this/model"))  # the windows and the no-answer threshold it was trained with
```

or serve it: `python -m serve_app --model path/to/this/model`.

## Intended use

Finding the passage span that answers a question in the user's own documents, with a person reading
the answer in its context. It is not a medical device and must not be the only basis of a clinical
decision.

## Bias, risks and limitations

Like the BERT model it starts from, this model can reflect the biases of its pre-training text
(books and English Wikipedia) and of its fine-tuning data; the predictions may include harmful
stereotypes across protected classes, identity characteristics and sensitive groups. It only ever
copies a span of the given passage, which can be wrong, out of date or out of context, and {abstention}
Check answers against the source before acting on them.
"""


def results_section(metrics: dict, config: TrainConfig) -> str:
    """The model card's figures: SQuAD 1.1's, or SQuAD 2.0's with whether and when the model abstains."""
    examples = metrics["eval_examples"]
    if "HasAns_f1" not in metrics and "NoAns_f1" not in metrics:
        return f"""Validation set: {examples} questions, all of them, SQuAD v1.1 metric (percent):

| exact match | F1 | precision | recall |
|---|---|---|---|
| {metrics['exact_match']:.2f} | {metrics['f1']:.2f} | {metrics['precision']:.2f} | {metrics['recall']:.2f} |
"""
    rows = [("all questions", metrics["total"], metrics["exact"], metrics["f1"])]
    rows += [(f"{label} ({split})", metrics[f"{split}_total"], metrics[f"{split}_exact"], metrics[f"{split}_f1"])
             for split, label in (("HasAns", "answerable"), ("NoAns", "unanswerable")) if f"{split}_f1" in metrics]
    table = "\n".join(f"| {name} | {count} | {exact:.2f} | {f1:.2f} |" for name, count, exact, f1 in rows)
    if config.qa.version_2_with_negative:
        behaviour = (
            f"**This model abstains**: it answers \"not in this document\" (an empty answer) when its no-answer "
            f"probability exceeds **{metrics['no_answer_threshold']:.4f}**, the threshold with the best validation F1 "
            f"(stored in `qa_config.json`; chosen on this same validation set, so these figures are optimistic). "
            f"On unanswerable questions, NoAns exact is the share it correctly declined to answer."
        )
        if declines_everything(metrics, config):
            behaviour += f"\n\n**Warning**: {DECLINES_EVERYTHING}."
    else:
        behaviour = "**This model never abstains**: it always returns a span, so it fails every unanswerable question."
    return f"""Validation set: {examples} questions, all of them, SQuAD v2.0 metric (percent):

| questions | count | exact | F1 |
|---|---|---|---|
{table}

{behaviour}
"""


MEMORISATION_WARNING = (
    "a model fine-tuned on clinical or other personal text can memorise and reproduce parts of it; "
    "share it only where that text may go"
)


def push_to_hub(model_dir: Path, repo: str, *, public: bool = False) -> None:
    """Upload the exported model to a private repository (public only when asked); any failure
    (offline, no token) is reported and skipped. An existing public repository is not uploaded to
    unless ``public``."""
    print(f"[train_job] warning: {MEMORISATION_WARNING}", file=sys.stderr)
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo, private=not public, exist_ok=True)
        if not public and not api.repo_info(repo).private:
            print(f"[train_job] --push-to-hub {repo} skipped: the repository exists and is public; "
                  "pass --hub-public to upload to it", file=sys.stderr)
            return
        api.upload_folder(folder_path=str(model_dir), repo_id=repo)
        print(f"[train_job] pushed {model_dir} to the Hub as {repo} ({'public' if public else 'private'})")
    except Exception as error:  # offline, missing token, permissions: the local export stands
        print(f"[train_job] --push-to-hub {repo} skipped: {type(error).__name__}: {error}")
