"""What the training benchmarks share: their common flags, the training questions and windows, and
the two recipes they time (the Hugging Face question-answering notebook's Trainer, and ``train_job`` on Ray Train).

- seed: Hugging Face ``Trainer`` with that notebook's settings: per-device batch 8, fp16 on a GPU
  (fp32 on CPU), every window padded to ``max_length``, Trainer's default optimiser. Throughput is
  measured over the steps after ``--warmup-steps``.
- ours: ``train_job`` as it runs: ``PreparedData`` (Ray Data featurisation) + ``build_trainer`` with one
  Ray Train worker holding all CPUs (or one GPU). Throughput is the loop's own training features/s of
  its last epoch (first epoch shown too); start-up (Ray Train workers, model load) and per-epoch
  evaluation/checkpointing are reported separately as overhead.

Figures are features (windows) per second: the recipes go through the same windows, so a ratio is
one of "feature-equivalents".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

from bench import benchlib, models
from qa_common import QAConfig
from qa_common.config import add_dataclass_flags, given_flags


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """The model, data, batch and precision flags of every training benchmark."""
    parser.add_argument("--gpu", action="store_true",
                        help="GPU mode: bert-base shape, fp16 seed / bf16 ours, larger batch and more data")
    parser.add_argument("--model", help=f"{models.MODEL_HELP} (default: bert-mini on CPU, bert-base with --gpu)")
    parser.add_argument("--data", type=Path, default=None,
                        help="SQuAD-format training questions (default: ../shared SQuAD sample article if present, "
                             "else train_job/quickstart_data/quickstart-train.jsonl)")
    parser.add_argument("--eval-data", type=Path, default=None,
                        help="validation questions for our loop's per-epoch evaluation (default: the matching dev file)")
    parser.add_argument("--eval-questions", type=int, default=16,
                        help="validation questions evaluated per epoch by our loop (its cost counts as overhead)")
    parser.add_argument("--max-train-samples", type=int, default=None, help="use only the first N training questions")
    parser.add_argument("--repeat", type=int, default=None,
                        help="replicate the training questions N times (default 1 on CPU, 30 with --gpu)")
    parser.add_argument("--batch-size", type=int, default=None, help="our per-worker batch (default 16 on CPU, 64 with --gpu)")
    parser.add_argument("--epochs", type=int, default=2, help="our epochs; the last one's throughput is the figure")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                        help="our precision (default fp32 on CPU, bf16 with --gpu)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(),
                        help="CPUs of the local Ray and of our single worker (default: all, %(default)s)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="our loop's --compile (torch.compile; default: on with --gpu, off on CPU)")
    parser.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                        help="our loop without length-grouped batches (its default groups them)")
    add_dataclass_flags(parser, QAConfig)


def finish_common_flags(args: argparse.Namespace) -> argparse.Namespace:
    """The defaults that depend on --gpu and --data."""
    args.qa = QAConfig(**given_flags(args, QAConfig))
    args.model = args.model or ("bert-base" if args.gpu else "bert-mini")
    args.data = args.data or benchlib.default_train_data()
    if args.eval_data is None:
        args.eval_data = (benchlib.QUICKSTART_VALIDATION if args.data == benchlib.QUICKSTART_TRAIN
                          else benchlib.default_eval_data())
    args.repeat = args.repeat or (30 if args.gpu else 1)
    args.batch_size = args.batch_size or (64 if args.gpu else 16)
    args.precision = args.precision or ("bf16" if args.gpu else "fp32")
    args.compile = args.gpu if args.compile is None else args.compile
    return args


def prepare(args, workdir: Path) -> dict:
    """The model directory, the training questions (also as a file) and their windows, printed."""
    from qa_common import load_tokenizer, read_squad

    model_dir = models.prepare_model_dir(args.model, workdir / "model")
    records = training_records(args)
    train_file = workdir / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    read_squad(args.eval_data)  # fail early on a bad file
    features = training_features(records, load_tokenizer(model_dir), args.qa)
    lengths = features["attention_mask"].sum(axis=1)
    print(f"[bench] {len(records)} training questions -> {len(lengths)} windows of {args.qa.max_length} tokens, "
          f"mean real length {lengths.mean():.0f}; model {models.model_summary(model_dir)}", flush=True)
    return {"model_dir": model_dir, "records": records, "train_file": train_file, "features": features,
            "lengths": lengths}


def settings_of(args, prepared: dict) -> dict:
    """The settings block of a result file."""
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    settings.update(data=benchlib.data_label(args.data), eval_data=benchlib.data_label(args.eval_data),
                    model_shape=models.model_summary(prepared["model_dir"]), train_questions=len(prepared["records"]),
                    train_features=int(len(prepared["lengths"])), mean_window_tokens=float(prepared["lengths"].mean()))
    settings.pop("out")
    return settings


class OurRuns:
    """Ray Train runs of ``train_job`` on the connected Ray (``benchlib.local_ray``), featurising the
    training windows once."""

    def __init__(self, args, prepared: dict, workdir: Path):
        self.args, self.prepared, self.workdir, self.data = args, prepared, workdir, None

    def fit(self, label: str, title: str, **overrides) -> dict:
        print(f"[bench] {title} ...", flush=True)
        config = train_config(self.args, self.prepared["model_dir"], self.workdir, self.prepared["train_file"], label,
                              **overrides)
        run = run_ours(config, title, data=self.data)
        self.data = run.pop("data")
        return {**run, "load_average": benchlib.load_average()}


def training_records(args) -> list[dict]:
    from qa_common import read_squad

    records = read_squad(args.data)[: args.max_train_samples]
    if args.repeat > 1:
        records = [{**r, "id": f"{r['id']}#{copy_index}"} for copy_index in range(args.repeat) for r in records]
    return records


def training_features(records, tokenizer, qa_config) -> dict:
    from qa_common import prepare_train_features

    return prepare_train_features(
        [r["question"] for r in records], [r["context"] for r in records],
        [r["answers"]["answer_start"][0] for r in records], [r["answers"]["text"][0] for r in records],
        tokenizer, qa_config,
    )


# --- the seed recipe: HF Trainer ------------------------------------------------------------------


def run_seed(args, model_dir: str, features: dict, workdir: Path) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForQuestionAnswering, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from qa_common import load_tokenizer

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, arguments, state, control, **kwargs):
            if torch.cuda.is_available() and args.gpu:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    clock = benchlib.Stopwatch()
    dataset = datasets.Dataset.from_dict({name: values.tolist() for name, values in features.items()})
    dataset.set_format("torch")
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir)
    training_args = TrainingArguments(
        output_dir=str(workdir / "hf-trainer"),
        per_device_train_batch_size=args.seed_batch_size,
        learning_rate=2e-5, weight_decay=0.01, num_train_epochs=1,
        max_steps=args.warmup_steps + args.seed_steps,
        fp16=args.gpu, use_cpu=not args.gpu,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none",
        disable_tqdm=True, seed=42,
    )
    timer = StepTimes()
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, processing_class=load_tokenizer(model_dir),
                      data_collator=default_data_collator, callbacks=[timer])
    setup_s = clock()
    output = trainer.train()
    timed = timer.ends[args.warmup_steps - 1 :]
    steady_s = timed[-1] - timed[0]
    timed_steps = len(timed) - 1
    return {
        "recipe": "seed: HF Trainer",
        "precision": "fp16" if args.gpu else "fp32",
        "batch_size": args.seed_batch_size,
        "padding": f"every window to {args.qa.max_length}",
        "optimizer": training_args.optim.value if hasattr(training_args.optim, "value") else str(training_args.optim),
        "timed_steps": timed_steps,
        "features_per_s": timed_steps * args.seed_batch_size / steady_s,
        "step_s": steady_s / timed_steps,
        "hf_reported_samples_per_s": output.metrics.get("train_samples_per_second"),
        "setup_s": setup_s,
        "train_call_s": output.metrics.get("train_runtime"),
    }


# --- ours: train_job with Ray Train ---------------------------------------------------------------


def train_config(args, model_dir: str, workdir: Path, train_file: Path, label: str, **overrides):
    """Our run's TrainConfig: the bench's settings, then ``overrides`` (num_workers, group_by_length, ...)."""
    from train_job.config import TrainConfig

    values = dict(
        model=model_dir, train_file=str(train_file), validation_file=str(args.eval_data),
        output_dir=str(workdir / label), num_workers=1, use_gpu=args.gpu,
        cpus_per_worker=min(8, args.cpus) if args.gpu else args.cpus, epochs=args.epochs,
        per_device_batch_size=args.batch_size, precision=args.precision, qa=args.qa, max_eval_samples=args.eval_questions,
        max_failures=0, checkpoints_to_keep=1, warmup_ratio=0.0, group_by_length=args.group_by_length,
        compile=args.compile,
    )
    values.update(overrides)
    return TrainConfig(**values).validate()


def run_ours(config, label: str, data=None) -> dict:
    """Fit ``config`` with Ray Train; features/s of the last epoch and the overhead around it."""
    from train_job.data import load_splits
    from train_job.driver import PreparedData, build_trainer, epoch_history

    clock = benchlib.Stopwatch()
    data = data or PreparedData(config, *load_splits(config))
    prepare_s = clock()
    trainer = build_trainer(config, data, name=f"bench-{label}", storage_path=str(Path(config.output_dir) / "checkpoints"))
    clock = benchlib.Stopwatch()
    result = trainer.fit()
    fit_s = clock()
    history = epoch_history(result)
    epoch_times = [history[0]["train_runtime_s"]] + [
        later["train_runtime_s"] - earlier["train_runtime_s"] for earlier, later in zip(history, history[1:])
    ]
    per_epoch = [h["train_samples_per_second"] for h in history]
    steps = math.ceil(math.ceil(data.train_feature_count / config.num_workers) / config.per_device_batch_size)
    return {
        "recipe": label,
        "precision": config.precision,
        "batch_size": config.per_device_batch_size,
        "workers": config.num_workers,
        "cpus_per_worker": None if config.use_gpu else config.cpus_per_worker,
        "group_by_length": config.group_by_length,
        "compile": config.compile,
        "padding": "trimmed per batch" + (", length-grouped" if config.group_by_length else ""),
        "train_features": data.train_feature_count,
        "features_per_s": per_epoch[-1],
        "features_per_s_per_worker": per_epoch[-1] / config.num_workers,
        "features_per_s_by_epoch": per_epoch,
        "step_s": epoch_times[-1] / steps,
        "prepare_s": prepare_s,
        "fit_s": fit_s,
        "train_s": sum(epoch_times),
        "overhead_s": fit_s - sum(epoch_times),
        "overhead_note": f"Ray Train start-up, model load, evaluation of {config.max_eval_samples} questions "
                         f"and a checkpoint, per epoch",
        "data": data,
    }
