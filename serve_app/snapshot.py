"""Serve a model from an immutable, content-addressed copy, taken when it is deployed or updated.

A model directory can change under a running service: training re-exports ``OUTPUT_DIR/model`` in
place, a cluster job writes the folder a service reads. Replicas load the weights when they start
(a scale-up from zero, a restart), while the threshold and calibration were fixed when the
application was built: served from the directory itself, they would mix two models and name the
old one. So the application builder copies every file of the directory into
``SNAPSHOT_DIR/<name>@<version>/`` (read-only), ``version`` being the SHA-256 of every file's path
and bytes (weights, tokenizer, ONNX files, settings), and the service reads only that copy: every
replica, however late it starts, loads what the gate checked, and ``/v1/model`` names it. The
default ``SNAPSHOT_DIR`` is ``.served-models`` beside the model directory (on a cluster, on the
storage every node mounts, like the model).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

SNAPSHOTS = ".served-models"
VERSION_CHARS = 12


def is_snapshot(path: str | Path) -> bool:
    path = Path(path)
    return path.parent.name == SNAPSHOTS and "@" in path.name


def content_version(directory: Path) -> str:
    """The SHA-256 (first :data:`VERSION_CHARS` hex digits) of every regular file's relative path and bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        with path.open("rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()[:VERSION_CHARS]


def display_name(directory: Path) -> str:
    """A model directory's name for display: runs/quickstart/model is "quickstart"; a snapshot keeps its source's."""
    if is_snapshot(directory):
        return directory.name.rsplit("@", 1)[0]
    return directory.parent.name if directory.name == "model" else directory.name


def version_of(directory: str | Path) -> str:
    """What ``X-Model-Version`` and ``/v1/model`` say: a snapshot's version, or the directory's content hash."""
    directory = Path(directory)
    return directory.name.rsplit("@", 1)[1] if is_snapshot(directory) else content_version(directory)


def snapshot(model_dir: str, snapshot_dir: str | None = None) -> str:
    """The snapshot of the local model directory ``model_dir`` (taken now unless it exists): its path."""
    source = Path(model_dir).resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"{model_dir}: not a local model directory")
    if is_snapshot(source):
        return str(source)
    store = Path(snapshot_dir).expanduser().resolve() if snapshot_dir else source.parent / SNAPSHOTS
    version = content_version(source)
    target = store / f"{display_name(source)}@{version}"
    if target.is_dir():
        return str(target)
    try:
        store.mkdir(parents=True, exist_ok=True)
        incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=store))
    except OSError as error:
        raise OSError(f"cannot write the served model's snapshot in {store} ({error.strerror}): give a writable "
                      "folder with --snapshot-dir (args.snapshot_dir)") from None
    try:
        shutil.copytree(source, incoming, dirs_exist_ok=True)  # links are copied as the files they point to
        if content_version(incoming) != version:
            raise OSError(f"{model_dir} changed while it was being copied for serving; deploy it again once "
                          "whatever writes it has finished")
        for path in [*incoming.rglob("*"), incoming]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            os.rename(incoming, target)
        except OSError:
            if not target.is_dir():  # else another deploy took the same snapshot at the same time
                raise
    finally:
        if incoming.exists():
            for path in [incoming, *incoming.rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)
            shutil.rmtree(incoming, ignore_errors=True)
    return str(target)
