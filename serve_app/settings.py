"""The application's settings (``args:`` in the Serve config, one ``python -m serve_app`` flag each)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from qa_common.backends import BACKENDS, DEFAULT_MAX_F1_LOSS
from qa_common.config import checked_overrides
from qa_common.inference import CPU_BATCH_TOKENS, FORWARD_BATCH_SIZE
from qa_common.library.index import BUILD_COMMAND
from qa_common.library.search import PASSAGES_READ
from qa_common.modeling import SERVING_DTYPES
from serve_app.schemas import MAX_PASSAGES


class ServeArgs(BaseModel):
    """Arguments of the application builder (``args:`` in the Serve config, ``key=value`` on ``serve run``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Model directory written by train_job, or any HF QA model dir / Hub name.")
    max_batch_size: int = Field(8, ge=1, description="Most questions answered in one model call.")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="How long a batch waits to fill up.")
    forward_batch_size: int = Field(FORWARD_BATCH_SIZE, ge=1, description="Windows per forward pass inside one model "
                                    f"call (on a CPU also at most {CPU_BATCH_TOKENS} tokens).")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest accepted request body.")
    max_context_chars: int = Field(100_000, ge=1, description="Longest accepted context.")
    dtype: Literal[SERVING_DTYPES] = Field(
        "auto", description="Weights' dtype; auto: bfloat16 on a GPU, float32 on CPU."
    )
    model_name: str | None = Field(
        None, description="Name shown by /v1/model; default: the Hub name or the model directory's name."
    )
    token_hashes_file: str | None = Field(
        None, description="File of SHA-256 hashes of the accepted API tokens (also read: $QA_TOKEN_HASHES)."
    )
    insecure_no_auth: bool = Field(
        False, description="Serve without tokens on a non-loopback address (never with patient data)."
    )
    max_windows_per_request: int = Field(
        256, ge=1, description="Most model windows one request may need (413 beyond); 100k characters of "
        "prose make about 85 windows of 384 tokens.",
    )
    max_windows_per_call: int = Field(
        64, ge=1, description="Most windows a model replica runs in one call; the deadline is checked between calls."
    )
    request_deadline_s: float = Field(
        30, gt=0, description="A request not answered within this gets 503 with Retry-After; work for it stops."
    )
    retry_after_s: int = Field(2, ge=1, description="The Retry-After of a 503 (busy or past the deadline).")
    audit_log: str | None = Field(
        None, description="File the JSON audit lines are appended to; default: the ingress's standard error."
    )
    reader_threads: int | None = Field(
        None, ge=1, description="Intra-op threads of each model replica; default: one per CPU it reserves (num_cpus). "
        "More lets one question use cores that would idle at low load (a one-machine service reading a library's "
        "passages: docs/serving.md), at the cost of contention when every core is busy.",
    )
    backend: Literal[BACKENDS] = Field(
        "auto", description="torch, onnx, onnx-int8 (files written by `python -m qa_common.export_onnx`) or auto: "
        "on CPU the fastest exported backend within max_f1_loss of PyTorch's F1, else torch; on a GPU torch.",
    )
    max_f1_loss: float = Field(
        DEFAULT_MAX_F1_LOSS, ge=0, description="F1 points below PyTorch that backend auto accepts for speed."
    )
    library: str | None = Field(
        None, description=f"A document library's folder ({BUILD_COMMAND}): enables POST /v1/ask and GET "
        "/v1/collections. On a cluster, a path every node mounts.",
    )
    passages: int = Field(
        PASSAGES_READ, ge=1, le=MAX_PASSAGES, description="Passages /v1/ask retrieves and reads when a request does not "
        "say: each one more may hold the answer and costs reading time (docs/library.md).",
    )
    feedback: str | None = Field(
        None, description="A folder for clinicians' feedback (a SQLite store holding patient text, 0600): enables "
        "POST /v1/feedback and a receipt (X-Response-Id) on every answer. On a cluster, a path every node mounts.",
    )
    snapshot_dir: str | None = Field(
        None, description="Where the read-only copies of the served models go (default: .served-models beside the "
        "model directory); on a cluster, a path every node mounts.",
    )
    previous_model: str | None = Field(
        None, description="The model an update replaced (set by `python -m serve_app update`; "
        "`update --rollback` returns to it); /v1/model shows its name and version.",
    )
    qa: dict[str, bool | int | float] = Field(
        default_factory=dict,
        description="QAConfig overrides (e.g. {max_length: 256}); unset ones come from the model directory's "
        "qa_config.json, else QAConfig's defaults.",
    )

    def replica_threads(self, reserved_cpus: float) -> int:
        """A model replica's intra-op threads: ``reader_threads``, else one per CPU it reserves."""
        return self.reader_threads or max(1, int(reserved_cpus))

    @field_validator("qa")
    @classmethod
    def _known_qa_settings(cls, value: dict[str, bool | int | float]) -> dict[str, bool | int | float]:
        return checked_overrides(value)
