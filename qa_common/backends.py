"""Inference backends: PyTorch, or ONNX Runtime on the files ``python -m qa_common.export_onnx`` writes.

A model directory may hold, next to its Hugging Face files, ``model.onnx`` (fp32, optionally with
ONNX Runtime's transformer fusions), ``model.int8.onnx`` (dynamic int8) and ``onnx_export.json``:
what was exported and how each backend measured against PyTorch on a validation set (F1, windows
per second). :func:`choose_backend` reads that record to pick a backend for ``auto``;
:func:`load_runner` returns the runner that :func:`qa_common.inference.predict_logits` takes.
"""

from __future__ import annotations

import json
from pathlib import Path

BACKENDS = ("torch", "onnx", "onnx-int8", "auto")
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}
EXPORT_RECORD_FILE = "onnx_export.json"
DEFAULT_MAX_F1_LOSS = 1.0  # F1 points below PyTorch that `auto` accepts for a faster backend


def export_command(model_dir: str | Path, backend: str) -> str:
    """The command that writes ``backend``'s file into ``model_dir``."""
    flags = " --optimize --int8" if backend == "onnx-int8" else " --optimize"
    return f"python -m qa_common.export_onnx {model_dir}{flags} --validation-file VALIDATION_FILE"


def onnx_file(model_dir: str | Path, backend: str) -> Path:
    """The ONNX file of ``backend`` in ``model_dir``; FileNotFoundError naming the export command if absent."""
    path = Path(model_dir) / ONNX_FILES[backend]
    if not path.is_file():
        raise FileNotFoundError(
            f"backend {backend!r} needs {path.name} in {model_dir}, which has none; write it with "
            f"`{export_command(model_dir, backend)}` (or train with `python -m train_job --export-onnx`)"
        )
    return path


def read_export_record(model_dir: str | Path) -> dict:
    """The model directory's ``onnx_export.json`` ({} when it has none)."""
    path = Path(model_dir) / EXPORT_RECORD_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def choose_backend(record: dict, *, device: str, max_f1_loss: float = DEFAULT_MAX_F1_LOSS) -> str:
    """The backend ``auto`` serves with.

    On a GPU: PyTorch (in bfloat16 by the serving dtype ``auto``). On a CPU: of PyTorch and the ONNX
    backends in ``record`` whose measured F1 is at most ``max_f1_loss`` points below PyTorch's, the
    one with the most windows per second measured at export; PyTorch when no ONNX backend qualifies
    (none exported, or exported without a validation set, so with no F1 to trust).
    """
    if device != "cpu":
        return "torch"
    candidates = {"torch": record.get("torch", {}).get("windows_per_s") or 0.0}
    for backend in ONNX_FILES:
        entry = record.get(backend) or {}
        if entry.get("f1_loss") is not None and entry["f1_loss"] <= max_f1_loss:
            candidates[backend] = entry.get("windows_per_s") or 0.0
    return max(candidates, key=candidates.get)


def resolve_backend(model_dir: str | Path, backend: str, *, device: str,
                    max_f1_loss: float = DEFAULT_MAX_F1_LOSS) -> str:
    """``backend`` itself, or for ``auto`` :func:`choose_backend` over the exported files that exist."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    record = {name: entry for name, entry in read_export_record(model_dir).items()
              if name not in ONNX_FILES or (Path(model_dir) / ONNX_FILES[name]).is_file()}
    return choose_backend(record, device=device, max_f1_loss=max_f1_loss)


def onnx_session(path: str | Path, *, threads: int | None = None):
    """An ONNX Runtime CPU session of ``path`` with ``threads`` intra-op threads (None: ONNX Runtime's default)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_runner(model_dir: str, backend: str, *, device: str = "cpu", dtype=None, threads: int | None = None,
                max_f1_loss: float = DEFAULT_MAX_F1_LOSS):
    """``(runner, tokenizer, info)`` for ``backend`` (one of :data:`BACKENDS`) on ``device``.

    ``dtype`` is the torch dtype of the PyTorch backend; ``threads`` the intra-op threads of either
    (None: the library's default). ``info`` says which backend runs, the file it loaded and the
    intra-op threads it runs with (0: ONNX Runtime's default).
    """
    from qa_common.inference import OnnxRunner, TorchRunner
    from qa_common.modeling import load_model_and_tokenizer, load_tokenizer

    backend = resolve_backend(model_dir, backend, device=device, max_f1_loss=max_f1_loss)
    if backend == "torch":
        import torch

        if threads and device == "cpu":
            torch.set_num_threads(threads)
        model, tokenizer = load_model_and_tokenizer(model_dir, dtype=dtype)
        model = model.to(device).eval()
        return TorchRunner(model), tokenizer, {
            "backend": "torch", "dtype": str(model.dtype).removeprefix("torch."), "name_or_path": model.config.name_or_path,
            "threads": torch.get_num_threads(),
        }
    if device != "cpu":
        raise ValueError(f"backend {backend!r} runs on CPU (onnxruntime's CPU build); serve with backend torch on a GPU")
    path = onnx_file(model_dir, backend)
    session = onnx_session(path, threads=threads)
    return OnnxRunner(session), load_tokenizer(model_dir), {
        "backend": backend, "dtype": "int8" if backend == "onnx-int8" else "float32", "file": path.name,
        "threads": session.get_session_options().intra_op_num_threads,
    }
