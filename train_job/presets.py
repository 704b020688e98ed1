"""The recipes as data: each preset is the values of a TrainConfig that ``--preset NAME`` starts from,
overridden flag by flag (``train_job.config``)."""

from __future__ import annotations

from pathlib import Path

from qa_common import MINILM

DATA_DIR = Path(__file__).parent / "quickstart_data"

PRESETS: dict[str, dict] = {
    # Runs offline on a laptop CPU in a few minutes: the packaged MiniLM and our clinical sample.
    "quickstart": {
        "model": MINILM,
        "train_file": str(DATA_DIR / "quickstart-train.jsonl"),
        "validation_file": str(DATA_DIR / "quickstart-validation.jsonl"),
        "epochs": 3,
        "learning_rate": 3e-4,
        "per_device_batch_size": 8,
        # One worker using every core (up to 2) beats single-threaded ones on a laptop; "auto" also
        # leaves a Tune trial driver its 0.1 CPU, so the tune example runs on a 2-core machine.
        "cpus_per_worker": None,
        "qa": {"max_length": 256, "stride": 96},
    },
    # A SQuAD model worth serving, trained on a 2-core CPU: 53 min where the CPU has AMX, 66 min on one without
    # (ACCURACY.md: how it was sized, what it scores): the packaged MiniLM, a seeded sample spread over every
    # article, negatives, validation on held-out articles so the data set's own validation split stays a clean test.
    # A quarter as many negatives as questions: the time half as many took buys 6,000 more questions, and
    # the model still abstains (ACCURACY.md, 40,000 questions against 34,000 with half as many).
    "squad-minilm": {
        "model": MINILM,
        "dataset": "squad",
        "output_dir": "runs/squad-minilm",
        "epochs": 1,
        "learning_rate": 1.5e-4,
        "per_device_batch_size": 16,
        "max_train_samples": 40000,
        "holdout_questions": 1500,
        "negative_ratio": 0.25,
        "negative_source": "article",
        "precision": "auto",
        "cheap_dropout": True,
        "max_batch_tokens": 1024,
        "cpus_per_worker": None,
        "checkpoint_every_steps": 200,
        "qa": {"max_length": 256, "stride": 96},
    },
    # One round of clinicians' feedback (docs/feedback.md): the served SQuAD model fine-tuned on
    # `python -m serve_app.feedback export`'s files mixed with as many SQuAD questions (--mix-file:
    # SQuAD's training set), the no-answer threshold chosen with 500 more of them. Gently (3e-5, 2
    # epochs): on the clinical sample's 80 feedback questions a stronger round (1e-4, 3 epochs) undid
    # more of the served model than the questions taught (docs/feedback.md has both, over seeds);
    # `serve_app update`'s gate is what keeps a worse model out.
    "feedback": {
        "model": "runs/squad-minilm/model",
        "train_file": "runs/feedback-export/train.json",
        "validation_file": "runs/feedback-export/validation.json",
        "output_dir": "runs/feedback-round",
        "epochs": 2,
        "learning_rate": 3e-5,
        "per_device_batch_size": 8,
        "mix_ratio": 1.0,
        "mix_validation": 500,
        "negative_ratio": 0.5,
        "cpus_per_worker": None,
        "qa": {"max_length": 256, "stride": 96},
    },
    # The squad-minilm model taught to read a library as /v1/ask reads it (docs/training.md, "Reading a
    # library"): each question of 60 SQuAD training articles with the 5 passages the library's hybrid
    # search returns for it (`python -m library_job mine`), one softmax over all their windows. 3,000 of
    # the 4,000 mined questions: 12 min on the 2-core CPU; 9,000 of 12,000 took 40 for 0.3 to 1.7 F1
    # more end to end (ACCURACY.md).
    "squad-minilm-library": {
        "model": "runs/squad-minilm/model",
        "train_file": "runs/library-mined/train.json",
        "validation_file": "runs/library-mined/validation.json",
        "output_dir": "runs/squad-minilm-library",
        "epochs": 1,
        "learning_rate": 5e-5,
        "per_device_batch_size": 16,
        "shared_normalization": True,
        "cheap_dropout": True,
        "max_train_samples": 3000,
        "max_eval_samples": 1500,
        "precision": "auto",
        "cpus_per_worker": None,
        "checkpoint_every_steps": 200,
        "qa": {"max_length": 256, "stride": 96},
    },
    # The Hugging Face question-answering notebook's recipe, which this project replaces: bert-base-cased on
    # SQuAD v1.1 from the Hub, mixed precision on GPUs.
    "squad-bert-base": {
        "model": "bert-base-cased",
        "dataset": "squad",
        "output_dir": "runs/squad-bert-base",
        "epochs": 3,
        "learning_rate": 2e-5,
        "weight_decay": 0.01,
        "warmup_ratio": 0.0,
        "per_device_batch_size": 32,
        "eval_batch_size": 256,
        "precision": "bf16",
        "use_gpu": True,
    },
}


def preset_values(preset: str, overrides: dict | None = None) -> dict:
    """A preset's values with the command's own ``overrides`` (e.g. the search's output dir) on top."""
    return {**PRESETS[preset], **(overrides or {})}
