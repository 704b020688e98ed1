"""The layout of a training checkpoint, in one place: what is written, and how it is read back.

A checkpoint directory holds::

    model/               Hugging Face model + tokenizer (save_pretrained), loadable on its own
    training_state.pt    optimiser, scheduler and loss-scaler state, counters (mid-epoch: the step
                         within the epoch), every worker's RNG states (tensors and plain values
                         only: read back with ``weights_only=True, map_location="cpu"``)
    predictions.json     {question id: answer text} on the validation set at this epoch (end of epoch only)
    history.json         the metrics of every epoch so far
    train_config.json    the settings that trained this model, and the run's fingerprint

Ray Train stores these directories (``ray.train.Checkpoint``); this module never imports Ray or
the training loop, so the export and other readers stay light.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from train_job.run_dir import MODEL, PREDICTIONS, TRAIN_CONFIG  # named as in a run's directory

TRAINING_STATE = "training_state.pt"
HISTORY = "history.json"


def write_checkpoint(directory: str | Path, *, model, tokenizer, training_state: dict, predictions: dict | None,
                     history: list[dict], train_config: dict) -> None:
    """``predictions`` is None for a mid-epoch checkpoint (no evaluation yet)."""
    import torch

    directory = Path(directory)
    model.save_pretrained(directory / MODEL)
    tokenizer.save_pretrained(directory / MODEL)
    torch.save(training_state, directory / TRAINING_STATE)
    if predictions is not None:
        (directory / PREDICTIONS).write_text(json.dumps(predictions, ensure_ascii=False), encoding="utf-8")
    (directory / HISTORY).write_text(json.dumps(history), encoding="utf-8")
    (directory / TRAIN_CONFIG).write_text(json.dumps(train_config, indent=2), encoding="utf-8")


def model_dir(directory: str | Path) -> Path:
    return Path(directory) / MODEL


def read_training_state(directory: str | Path) -> dict:
    """The training state on the CPU; refuses anything but tensors and plain values (no unpickling)."""
    import torch

    return torch.load(Path(directory) / TRAINING_STATE, weights_only=True, map_location="cpu")


def read_history(directory: str | Path) -> list[dict]:
    return json.loads((Path(directory) / HISTORY).read_text(encoding="utf-8"))


def read_train_config(directory: str | Path) -> dict:
    """The settings (and fingerprint) that trained the checkpoint's model."""
    return json.loads((Path(directory) / TRAIN_CONFIG).read_text(encoding="utf-8"))


def rng_states() -> dict:
    """This process's random number generators (torch, CUDA, numpy, python) as tensors, which
    ``weights_only=True`` loads: restoring them makes a resumed run draw the same dropout masks."""
    import numpy as np
    import torch

    numpy_kind, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    python_version, python_state, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(numpy_keys.astype(np.int64)), "pos": int(numpy_pos),
                  "has_gauss": int(numpy_has_gauss), "gauss": float(numpy_gauss)},
        "python": {"version": python_version, "state": torch.tensor(python_state, dtype=torch.int64),
                   "gauss": python_gauss},
    }


def restore_rng_states(states: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy = states["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["gauss"]))
    python = states["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))


def copy_model_and_predictions(directory: str | Path, model_dest: Path, predictions_dest: Path) -> None:
    """Copy the checkpoint's model directory (replacing ``model_dest``) and its predictions out."""
    if model_dest.exists():
        shutil.rmtree(model_dest)
    shutil.copytree(model_dir(directory), model_dest)
    shutil.copyfile(Path(directory) / PREDICTIONS, predictions_dest)
