"""What ``GET /v1/model`` shows: the served model's name and version (and the previous one's, after
an update), its settings and the request limits. Built once, when the application is. Names are
directories' names, never their paths."""

from pathlib import Path

from qa_common import QAConfig
from qa_common.backends import resolve_backend
from qa_common.modeling import dtype_name
from serve_app.schemas import MAX_QUESTION_CHARS, MAX_QUESTIONS_PER_REQUEST
from serve_app.settings import ServeArgs
from serve_app.snapshot import display_name, version_of


def previous_model(model: str | None) -> dict | None:
    """The name and version of the model an update replaced (``update --rollback`` returns to it)."""
    if not model:
        return None
    path = Path(model)
    return {"name": display_name(path), "version": version_of(path) if path.is_dir() else None}


def model_card(model_path: str, args: ServeArgs, qa_config: QAConfig, model_options: dict) -> dict:
    """What /v1/model shows: the model's name and version (and the previous one's, after an update), its
    settings, the request limits and, with a library, how many passages /v1/ask reads by default."""
    actor_options = model_options.get("ray_actor_options", {})
    device = "cuda" if actor_options.get("num_gpus", 0) else "cpu"
    backend = resolve_backend(model_path, args.backend, device=device, max_f1_loss=args.max_f1_loss)
    return {
        "name": args.model_name or display_name(Path(model_path)),
        "version": version_of(model_path),
        "previous": previous_model(args.previous_model),
        "device": device,
        "backend": backend,
        "backend_requested": args.backend,
        "dtype": {"onnx": "float32", "onnx-int8": "int8"}.get(backend) or dtype_name(args.dtype, device),
        "threads": args.replica_threads(actor_options.get("num_cpus", 1)),  # Serve's default: one CPU per replica
        **qa_config.to_dict(),
        "max_batch_size": args.max_batch_size,
        "limits": {
            "questions_per_request": MAX_QUESTIONS_PER_REQUEST,
            "question_chars": MAX_QUESTION_CHARS,
            "context_chars": args.max_context_chars,
            "body_bytes": args.max_body_bytes,
            "windows_per_request": args.max_windows_per_request,
            "deadline_s": args.request_deadline_s,
        },
        **({"passages": args.passages} if args.library else {}),  # what /v1/ask reads unless told
    }
