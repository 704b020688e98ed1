"""Runs never mix: a run directory holds one run, identified by the fingerprint of its settings and data.

Re-running a command with the same output dir and run name resumes the run there (Ray Train
resumes from the same storage path and name). That is only right when the run there was started
with the same settings and data: otherwise the old run's model would be resumed, or exported under
the new settings' labels. So the driver writes the fingerprint into the run directory when the run
starts, every checkpoint carries it, and before fitting:

- no run there: train anew (``--resume`` refuses: nothing to resume);
- a run with the same fingerprint: resume it;
- a run with another fingerprint (or none): refuse, naming what changed, unless ``--overwrite``,
  which deletes the run (and the export of it) and trains anew.

The fingerprint holds the settings that change the trained model (not the output paths, resources
or logging) and, per data split, the file's name, size and a SHA-256 of its first 4 MiB, plus the
number of questions used and a hash of their ids. It never holds any text of the data.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from train_job.config import TrainConfig, TrainJobError

FINGERPRINT_FILE = "run_fingerprint.json"
HEAD_BYTES = 4 * 2**20
# The TrainConfig fields that decide what model a run trains.
MODEL_SETTINGS = ("model", "epochs", "learning_rate", "weight_decay", "warmup_ratio", "per_device_batch_size",
                  "num_workers", "group_by_length", "precision", "seed", "max_train_samples", "max_eval_samples", "sample",
                  "holdout_questions", "negative_ratio", "negative_source", "qa")


def file_fingerprint(path: str | Path) -> dict:
    path = Path(path)
    with path.open("rb") as file:
        head = hashlib.sha256(file.read(HEAD_BYTES)).hexdigest()
    return {"file": path.name, "bytes": path.stat().st_size, "sha256_first_4MiB": head}


def records_fingerprint(records: list[dict]) -> dict:
    ids = hashlib.sha256("\n".join(str(r["id"]) for r in records).encode("utf-8")).hexdigest()
    return {"questions": len(records), "ids_sha256": ids}


def run_fingerprint(config: TrainConfig, train_records: list[dict], validation_records: list[dict], *,
                    ignore: tuple[str, ...] = (), extra: dict | None = None) -> dict:
    """The settings in :data:`MODEL_SETTINGS` (less ``ignore``, plus ``extra``) and the data of both splits."""
    values = config.to_dict()
    settings = {name: values[name] for name in MODEL_SETTINGS if name not in ignore}
    data = {}
    for split, file, records in (("train", config.train_file, train_records),
                                 ("validation", config.validation_file or config.train_file, validation_records)):
        source = {"dataset": config.dataset} if config.dataset else file_fingerprint(file)
        data[split] = {**source, **records_fingerprint(records)}
    # As JSON holds it (tuples become lists), so that a recorded fingerprint compares equal.
    return json.loads(json.dumps({"settings": {**settings, **(extra or {})}, "data": data}))


def changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """What differs between two fingerprints, as ``name: old -> new`` lines."""
    found = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(before, dict) and isinstance(after, dict):
            found += changes(before, after, prefix=f"{name}.")
        elif before != after:
            found.append(f"{name}: {before} -> {after}")
    return found


def claim_run_dir(run_dir: str, fingerprint: dict, config: TrainConfig, *, exported: list[Path] = ()) -> bool:
    """Decide between resuming and training anew in ``run_dir`` (a path or a URI); returns True to resume.

    Raises TrainJobError when the directory holds another run (or ``--resume`` finds none); with
    ``--overwrite`` deletes the run and ``exported`` (the files an earlier export of it wrote).
    """
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(run_dir if "://" in run_dir else str(Path(run_dir).resolve()))
    info = filesystem.get_file_info(path)
    exists = info.type == pyarrow.fs.FileType.Directory and bool(
        filesystem.get_file_info(pyarrow.fs.FileSelector(path)))
    if exists and config.overwrite:
        print(f"[train_job] --overwrite: deleting the run in {run_dir}", flush=True)
        filesystem.delete_dir(path)
        for stale in exported:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
        exists = False
    if not exists:
        if config.resume:
            raise TrainJobError(f"--resume: there is no run to resume in {run_dir}")
        filesystem.create_dir(path)
        with filesystem.open_output_stream(f"{path}/{FINGERPRINT_FILE}") as file:
            file.write(json.dumps(fingerprint, indent=2).encode("utf-8"))
        return False
    try:
        with filesystem.open_input_stream(f"{path}/{FINGERPRINT_FILE}") as file:
            recorded = json.loads(file.read())
    except FileNotFoundError:
        raise TrainJobError(
            f"{run_dir} holds files but no {FINGERPRINT_FILE}: not a train_job run, or one whose start failed. "
            "Use --overwrite to train anew there, or another --output-dir or --run-name") from None
    different = changes(recorded, fingerprint)
    if different:
        raise TrainJobError(
            f"{run_dir} holds a run with other settings or data ({'; '.join(different)}). Use --overwrite to "
            "train anew there (deleting it), or another --output-dir or --run-name")
    print(f"[train_job] resuming the run in {run_dir} (same settings and data)", flush=True)
    return True
