"""The one typed configuration of a training run: its fields, command-line flags over a preset, validation."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from qa_common import MINILM, QAConfig
from qa_common.config import FITTED_SETTINGS, add_dataclass_flags, dashed, given_flags
from qa_common.config import setting as _flag
from qa_common.inference import FORWARD_BATCH_SIZE
from qa_common.negatives import SOURCES as NEGATIVE_SOURCES
from qa_common.splits import SAMPLINGS
from train_job.allocator import ALLOCATORS, DEFAULT_ALLOCATOR, TCMALLOC_PACKAGE, tcmalloc_library
from train_job.presets import PRESETS, preset_values
from train_job.ray_cluster import ADDRESS_HELP

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TRACKERS = ("tensorboard", "mlflow")
AUTO_CPUS = "auto: the cluster's CPUs shared by the workers (less a Tune trial driver's 0.1), at most 2 each"


class TrainJobError(Exception):
    """A problem the user fixes (resources, a run directory holding another run, ...): the command
    prints the message and exits with status 2."""


@dataclass
class TrainConfig:
    model: str = _flag("Hub name or local directory of the model to fine-tune", default=MINILM)
    dataset: str | None = _flag("Hub data set name (e.g. squad); instead of --train-file/--validation-file", default=None)
    train_file: str | None = _flag("SQuAD-format training file (.json, .jsonl, .parquet, optionally .gz)", default=None)
    validation_file: str | None = _flag("SQuAD-format validation file", default=None)
    output_dir: str = _flag("where the model directory, metrics.json and predictions.json go", default="runs/quickstart")
    storage_path: str | None = _flag(
        "Ray Train storage for checkpoints: a shared path or URI on a multi-node cluster "
        "(default: OUTPUT_DIR/checkpoints)", default=None)
    run_name: str = _flag("name of the Ray Train run; re-running with the same name and storage resumes it", default="train")
    resume: bool = _flag("insist on resuming the run in the storage (fail when there is none or its settings or data "
                         "differ); without --resume a run with the same settings resumes and one with others is refused",
                         default=False)
    overwrite: bool = _flag("delete the run in the storage (and the export in OUTPUT_DIR) and train anew", default=False)
    num_workers: int = _flag("Ray Train workers (data-parallel replicas)", default=1)
    use_gpu: bool = _flag("one GPU per worker", default=False)
    cpus_per_worker: float | None = _flag("CPUs reserved for each worker", default=1.0)
    worker_start_timeout_s: float = _flag(
        "seconds the workers may wait for their resources (e.g. while an autoscaler adds nodes) before the run fails",
        default=600.0)
    epochs: int = _flag("training epochs", default=2)
    learning_rate: float = _flag("peak AdamW learning rate", default=1e-4)
    weight_decay: float = _flag("AdamW weight decay (not applied to biases and LayerNorm)", default=0.01)
    warmup_ratio: float = _flag("fraction of steps spent warming the learning rate up linearly", default=0.1)
    per_device_batch_size: int = _flag("training features per worker per step", default=16)
    eval_batch_size: int = _flag("features per forward pass during evaluation", default=FORWARD_BATCH_SIZE)
    group_by_length: bool = _flag("batch windows of similar length together so less padding is computed", default=True)
    shared_normalization: bool = _flag(
        "one softmax over all windows of a question (all its passages: records sharing a 'group', as "
        "`python -m library_job mine` writes them) instead of one per window, so spans of different passages "
        "compare as /v1/ask compares them (train_job/loss.py); a batch then holds whole questions, "
        "--per-device-batch-size windows on average", default=False)
    attention_dropout: float | None = _flag(
        "dropout on attention probabilities while training (default: the model's own, 0.1 for BERTs); 0 lets "
        "PyTorch use its fused attention kernel on CPU, 1.4x faster steps for the squad-minilm preset "
        "(BENCHMARKS.md)", default=None)
    cheap_dropout: bool = _flag(
        "on CPU workers, dropout masks from four 15-bit lanes of each 64-bit draw and an attention that keeps less "
        "for its backward (train_job/dropout.py): the squad-minilm preset's steps 1.15x faster and 0.5 GB lighter; "
        "another random stream than PyTorch's, so a run learns as under another seed (BENCHMARKS.md)", default=False)
    gradient_checkpointing: bool = _flag(
        "keep only each layer's input for the backward and recompute the rest there (dropout masks replayed, so "
        "the same gradients): for a machine short of memory; the squad-minilm preset's worker peaks at 2.0 GB "
        "instead of 2.6 GB and trains at 0.75x the windows/s (BENCHMARKS.md)", default=False)
    max_batch_tokens: int | None = _flag(
        "cut a batch of more than N tokens (windows x its padded length) into parts of at most N, a question's "
        "windows kept together, and add up their gradients before the one update: the same update, only the dropout "
        "masks drawn part by part, and one part's activations in memory at a time: the squad-minilm preset takes "
        "1024 (its worker at 1.6 GB instead of 2.6 GB on 1,000 questions, at the same windows/s); 512 gives 1.4 GB "
        "at 0.8x (BENCHMARKS.md)", default=None)
    allocator: str = _flag(
        "the training workers' memory allocator: tcmalloc (preloaded; Debian/Ubuntu package "
        f"{TCMALLOC_PACKAGE}), glibc (keeping freed memory for the next step), or auto: tcmalloc where installed; "
        "the squad-minilm preset's worker on 8,000 questions at 1.3 GB instead of 1.8 GB on tcmalloc, 1.09x the "
        "windows/s, the same losses (BENCHMARKS.md)", default=DEFAULT_ALLOCATOR)
    compile: bool = _flag("torch.compile the model (pays off on GPUs for long runs; slow start)", default=False)
    precision: str = _flag("fp32, bf16 (autocast), fp16 (autocast + loss scaling; GPU only), or auto: bf16 where the "
                           "worker's GPU or CPU computes it natively (AVX512-BF16/AMX), else fp32", default="fp32")
    seed: int = _flag("random seed (model head, shuffling)", default=42)
    max_train_samples: int | None = _flag("use N training questions (see --sample)", default=None)
    max_eval_samples: int | None = _flag("use N validation questions (see --sample)", default=None)
    sample: str = _flag("how --max-train-samples/--max-eval-samples choose: spread (a seeded share of every article, "
                        "--seed) or first (the file's first N: on SQuAD one or two articles)", default="spread")
    holdout_questions: int | None = _flag(
        "validate on whole articles held out of the training data (seeded, at least N questions) instead of a "
        "validation file or split, which then stays untouched for a final report", default=None)
    mix_file: str | None = _flag(
        "a SQuAD-format file whose questions are mixed into the training data (e.g. SQuAD's training set when "
        "fine-tuning a SQuAD model on clinicians' feedback), so a model taught a few hundred new questions keeps "
        "what it knew", default=None)
    mix_ratio: float = _flag("questions drawn from --mix-file per training question (seeded, spread over its "
                             "articles)", default=1.0)
    mix_validation: int | None = _flag(
        "N more questions of --mix-file (none of those mixed into training) added to the validation split: the "
        "no-answer threshold and the calibration are chosen there, and a feedback export's validation split holds "
        "a few dozen questions, too few to choose them on (bench/feedback_round.py: 13.5 F1 lost on SQuAD)",
        default=None)
    negative_ratio: float = _flag(
        "unanswerable questions to synthesise per answerable question (its question paired with another "
        "paragraph holding none of its answers), in training and, when it has none, validation data; > 0 trains "
        "a model that can abstain", default=0.0)
    negative_source: str = _flag(
        "where a synthesised negative's paragraph comes from: article (another paragraph of the same article), "
        "other (another article) or mix (half each, and the other kind where an article has no such paragraph); "
        "on SQuAD, article generalised best (ACCURACY.md: the squad-minilm preset takes it)", default="mix")
    max_failures: int = _flag("worker failures to recover from (resuming from the last checkpoint)", default=2)
    checkpoints_to_keep: int = _flag("checkpoints kept, the best by validation F1 (and always the latest)", default=2)
    checkpoint_every_steps: int | None = _flag(
        "also checkpoint every N steps within an epoch, so a lost worker costs minutes, not an epoch "
        "(train_job only; Tune trials checkpoint every epoch)", default=None)
    report_to: str | None = _flag("comma-separated trackers: tensorboard (event files in OUTPUT_DIR/tensorboard), "
                                  "mlflow (the local store OUTPUT_DIR/mlflow.db, or --mlflow-tracking-uri)", default=None)
    mlflow_tracking_uri: str | None = _flag("MLflow tracking URI (default: sqlite:///OUTPUT_DIR/mlflow.db)", default=None)
    export_onnx: bool = _flag(
        "also write model.onnx and model.int8.onnx (optimised; EM/F1 against PyTorch measured on the validation "
        "split) for serve_app's ONNX Runtime backends", default=False)
    push_to_hub: str | None = _flag("Hub repository to upload the exported model to, private unless --hub-public "
                                    "(skipped when offline)", default=None)
    hub_public: bool = _flag("make the --push-to-hub repository public: fine-tuned models can memorise training text",
                             default=False)
    address: str | None = _flag(ADDRESS_HELP, default=None)
    # Windowing and decoding, shared with evaluation and serving (flags from QAConfig's fields).
    qa: QAConfig = dataclasses.field(default_factory=QAConfig)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """The inverse of :meth:`to_dict` (``qa`` may be a dict or a QAConfig)."""
        qa = values.get("qa", {})
        return cls(**{**values, "qa": qa if isinstance(qa, QAConfig) else QAConfig(**qa)})

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the flag to fix; returns self."""
        positive = ["num_workers", "epochs", "per_device_batch_size", "eval_batch_size", "cpus_per_worker",
                    "worker_start_timeout_s", "checkpoint_every_steps", "max_batch_tokens"]
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{dashed(name)} must be positive, got {getattr(self, name)}")
        if self.resume and self.overwrite:
            raise ValueError("give --resume or --overwrite, not both")
        unknown = set(self.trackers) - set(TRACKERS)
        if unknown:
            raise ValueError(f"--report-to takes {', '.join(TRACKERS)}; got {', '.join(sorted(unknown))}")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning-rate must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.max_failures < 0 or self.checkpoints_to_keep < 1:
            raise ValueError("--weight-decay and --max-failures must be >= 0, --checkpoints-to-keep >= 1")
        if self.attention_dropout is not None and not 0 <= self.attention_dropout < 1:
            raise ValueError(f"--attention-dropout must be in [0, 1), got {self.attention_dropout}")
        if not self.mix_ratio > 0:
            raise ValueError(f"--mix-ratio must be positive, got {self.mix_ratio}")
        if self.mix_validation is not None and self.mix_validation < 1:
            raise ValueError(f"--mix-validation must be positive, got {self.mix_validation}")
        if self.mix_validation and not self.mix_file:
            raise ValueError("--mix-validation needs --mix-file FILE to draw its questions from (the feedback preset: "
                             "SQuAD's training set, e.g. train-v1.1.json)")
        if not self.negative_ratio >= 0:
            raise ValueError(f"--negative-ratio must be >= 0, got {self.negative_ratio}")
        for name in ("max_train_samples", "max_eval_samples", "holdout_questions"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{dashed(name)} must be positive")
        if self.sample not in SAMPLINGS:
            raise ValueError(f"--sample must be one of {', '.join(SAMPLINGS)}, got {self.sample!r}")
        if self.negative_source not in NEGATIVE_SOURCES:
            raise ValueError(f"--negative-source must be one of {', '.join(NEGATIVE_SOURCES)}, "
                             f"got {self.negative_source!r}")
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"--allocator must be one of {', '.join(ALLOCATORS)}, got {self.allocator!r}")
        if self.allocator == "tcmalloc" and tcmalloc_library() is None:
            raise ValueError(f"--allocator tcmalloc: the library is not installed here (Debian/Ubuntu: apt-get install "
                             f"{TCMALLOC_PACKAGE}); or give --allocator glibc")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("--precision fp16 needs --use-gpu (on CPU use bf16 or fp32)")
        if self.holdout_questions and self.validation_file:
            raise ValueError("give --validation-file or --holdout-questions, not both")
        if self.dataset and (self.train_file or self.validation_file):
            raise ValueError("give either --dataset or --train-file/--validation-file, not both")
        if not self.dataset and not (self.train_file and (self.validation_file or self.holdout_questions)):
            raise ValueError("give --dataset, or --train-file with --validation-file or --holdout-questions")
        return self

    @property
    def trackers(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in (self.report_to or "").split(",") if name.strip())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_absolute_paths(self) -> "TrainConfig":
        """The output directory, and a model given as a local directory, as absolute paths: Ray Train's
        workers and Tune's trials run in other working directories."""
        model = Path(self.model)
        return dataclasses.replace(self, output_dir=str(Path(self.output_dir).resolve()),
                                   model=str(model.resolve()) if model.is_dir() else self.model)


def add_config_flags(parser: argparse.ArgumentParser, preset: str = "quickstart", overrides: dict | None = None) -> None:
    """``--preset``, then one flag per TrainConfig and QAConfig field, all defaulting to None so presets fill the gaps.

    The help shows the defaults ``preset`` applies (what ``--help`` after ``--preset NAME`` prints). No
    ``--no-answer-threshold``: training's evaluation chooses the threshold (the best validation F1).
    """
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quickstart",
                        help="starting values, overridden flag by flag (default: quickstart)")
    values = preset_values(preset, overrides)
    shown = {**values, "cpus_per_worker": AUTO_CPUS} if values.get("cpus_per_worker", 1) is None else values
    add_dataclass_flags(parser, TrainConfig, defaults=shown, skip=("qa",))
    add_dataclass_flags(parser, QAConfig, defaults=values.get("qa"), skip=FITTED_SETTINGS)


def config_from_args(args: argparse.Namespace, overrides: dict | None = None) -> TrainConfig:
    """The preset's values (with ``overrides``), then every flag given; validated."""
    values = preset_values(args.preset, overrides)
    explicit = given_flags(args, TrainConfig, skip=("qa",))
    if "dataset" in explicit:  # an explicit data source replaces the preset's
        values.pop("train_file", None), values.pop("validation_file", None)
    if "train_file" in explicit or "validation_file" in explicit:
        values.pop("dataset", None)
    if "validation_file" in explicit and "holdout_questions" not in explicit:
        values.pop("holdout_questions", None)
    values.update(explicit)
    try:
        values["qa"] = QAConfig(**{**values.get("qa", {}), **given_flags(args, QAConfig)})
    except ValueError as error:  # name the flags, not the dataclass fields
        raise ValueError(str(error).replace("QAConfig.", "--").replace("_", "-")) from None
    return TrainConfig(**values).validate()


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
