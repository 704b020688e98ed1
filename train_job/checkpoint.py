"""The layout of a training checkpoint, in one place: what is written, and how it is read back.

A checkpoint directory holds::

    model/               Hugging Face model + tokenizer (save_pretrained), loadable on its own
    training_state.pt    optimiser, scheduler and loss-scaler state plus counters (tensors and
                         plain values only: read back with ``weights_only=True``)
    predictions.json     {question id: answer text} on the validation set at this epoch
    history.json         the metrics of every epoch so far

Ray Train stores these directories (``ray.train.Checkpoint``); this module never imports Ray or
the training loop, so the export and other readers stay light.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

MODEL = "model"
TRAINING_STATE = "training_state.pt"
PREDICTIONS = "predictions.json"
HISTORY = "history.json"


def write_checkpoint(directory: str | Path, *, model, tokenizer, training_state: dict, predictions: dict,
                     history: list[dict]) -> None:
    import torch

    directory = Path(directory)
    model.save_pretrained(directory / MODEL)
    tokenizer.save_pretrained(directory / MODEL)
    torch.save(training_state, directory / TRAINING_STATE)
    (directory / PREDICTIONS).write_text(json.dumps(predictions, ensure_ascii=False), encoding="utf-8")
    (directory / HISTORY).write_text(json.dumps(history), encoding="utf-8")


def model_dir(directory: str | Path) -> Path:
    return Path(directory) / MODEL


def read_training_state(directory: str | Path) -> dict:
    """The training state on the CPU; refuses anything but tensors and plain values (no unpickling)."""
    import torch

    return torch.load(Path(directory) / TRAINING_STATE, weights_only=True, map_location="cpu")


def read_history(directory: str | Path) -> list[dict]:
    return json.loads((Path(directory) / HISTORY).read_text(encoding="utf-8"))


def copy_model_and_predictions(directory: str | Path, model_dest: Path, predictions_dest: Path) -> None:
    """Copy the checkpoint's model directory (replacing ``model_dest``) and its predictions out."""
    if model_dest.exists():
        shutil.rmtree(model_dest)
    shutil.copytree(model_dir(directory), model_dest)
    shutil.copyfile(Path(directory) / PREDICTIONS, predictions_dest)
