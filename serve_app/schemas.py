"""The HTTP API's request and response shapes, and the application builder's arguments."""

import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from qa_common.backends import BACKENDS, DEFAULT_MAX_F1_LOSS
from qa_common.config import checked_overrides
from qa_common.inference import FORWARD_BATCH_SIZE
from qa_common.library.index import BUILD_COMMAND, NAME_PATTERN
from qa_common.library.search import PASSAGES_READ
from qa_common.modeling import SERVING_DTYPES

MAX_QUESTION_CHARS = 1_000
MAX_TOP_K = 20
MAX_ANSWER_TOKENS = 512
MAX_QUESTIONS_PER_REQUEST = 64

MAX_PASSAGES = 20
MAX_DOCUMENT_CHARS = 512

REQUEST_SHAPE = (
    f'{{"question": str, "context": str, "top_k"?: int 1-{MAX_TOP_K}, "max_answer_length"?: int 1-{MAX_ANSWER_TOKENS}, '
    f'"allow_no_answer"?: bool}}, or a list of 1 to {MAX_QUESTIONS_PER_REQUEST} such objects'
)
ASK_SHAPE = (f'{{"question": str, "top_k"?: int 1-{MAX_TOP_K}, "passages"?: int 1-{MAX_PASSAGES}, "collection"?: str, '
             f'"document"?: str, "max_answer_length"?: int 1-{MAX_ANSWER_TOKENS}, "allow_no_answer"?: bool}}')


class AnswerRequest(BaseModel):
    """One question about one context (a document of any length: it is read in overlapping windows)."""

    # Strict: "3" is not an int and 3 is not a string; unknown fields are typos, not extras.
    model_config = ConfigDict(strict=True, extra="forbid")

    # The pattern documents the "not only whitespace" check below for clients generated from the schema.
    question: str = Field(
        min_length=1, max_length=MAX_QUESTION_CHARS, json_schema_extra={"pattern": r"\S"},
        examples=["Which drug was stopped?"],
    )
    context: str = Field(
        min_length=1, json_schema_extra={"pattern": r"\S"},
        examples=["Warfarin was stopped on admission because of bleeding."],
    )
    top_k: int = Field(1, ge=1, le=MAX_TOP_K, description="How many answers; more than 1 returns a list.")
    max_answer_length: int | None = Field(
        None, ge=1, le=MAX_ANSWER_TOKENS, description="Longest answer in tokens; default: the service's setting."
    )
    allow_no_answer: bool | None = Field(
        None, description="May the answer be 'not in this document' (an empty answer with start = end = -1)? "
        "Default: the model's setting, true for a model trained with unanswerable questions.",
    )

    @field_validator("question", "context")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must contain some text, not only whitespace")
        return value

    @field_validator("context")
    @classmethod
    def _within_context_cap(cls, value: str, info: ValidationInfo) -> str:
        cap = (info.context or {}).get("max_context_chars")
        if cap is not None and len(value) > cap:
            raise ValueError(
                f"has {len(value):,} characters, more than this service's limit of {cap:,}; send a shorter document"
            )
        return value


class AskRequest(BaseModel):
    """One question asked of the document library: the passages retrieved are read as one candidate set."""

    model_config = ConfigDict(strict=True, extra="forbid")

    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS, json_schema_extra={"pattern": r"\S"},
                          examples=["What is the loading dose of amiodarone?"])
    top_k: int = Field(1, ge=1, le=MAX_TOP_K, description="How many answers, ranked across the passages read.")
    passages: int | None = Field(None, ge=1, le=MAX_PASSAGES,
                                 description="How many passages to retrieve and read; default: the service's.")
    collection: str | None = Field(None, pattern=f"^{NAME_PATTERN.pattern}$", description="Only this collection.")
    document: str | None = Field(None, min_length=1, max_length=MAX_DOCUMENT_CHARS,
                                 description="Only this document (its name as /v1/ask answers cite it).")
    max_answer_length: int | None = Field(
        None, ge=1, le=MAX_ANSWER_TOKENS, description="Longest answer in tokens; default: the service's setting."
    )
    allow_no_answer: bool | None = Field(
        None, description="May the answer be 'not in these documents'? Default: the model's setting.")

    @field_validator("question")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must contain some text, not only whitespace")
        return value


def parse_object(payload, schema: type[BaseModel], shape: str):
    """A decoded JSON body that must be one object of ``schema`` (``shape`` in words), or :class:`InvalidRequest`."""
    if not isinstance(payload, dict):
        raise InvalidRequest(f"the body must be a JSON object, got {type(payload).__name__}; send {shape}")
    try:
        return schema.model_validate(payload)
    except ValidationError as error:
        raise InvalidRequest(describe_validation_errors(error.errors(), shape)) from None


def parse_ask(payload) -> AskRequest:
    """The library question in a decoded JSON body, or :class:`InvalidRequest`."""
    return parse_object(payload, AskRequest, ASK_SHAPE)


class Answer(BaseModel):
    """One answer. "Not in this document" is ``{"answer": "", "start": -1, "end": -1}``."""

    answer: str = Field(description="The answer text, exactly context[start:end]; empty for 'not in this document'.")
    score: float = Field(
        description="Probability of this answer among all the candidates for the question (the spans, and "
        "'not in this document' when allowed), in [0, 1]; never increases down a top_k list."
    )
    start: int = Field(description="Start offset in the context in characters (Unicode code points); -1 for no answer.")
    end: int = Field(description="End offset in the context (exclusive); -1 for no answer.")
    no_answer_probability: float = Field(
        description="Probability that the document does not answer the question, against the best span, in "
        "[0, 1]; the model abstains when it exceeds its no_answer_threshold."
    )


class Citation(BaseModel):
    """Where a library answer comes from; all null for 'not in these documents'."""

    collection: str | None
    document: str | None = Field(description="The document's path inside its collection's folder.")
    page: int | None = Field(description="1-based page of a PDF; null for formats without pages.")
    section: str | None = Field(description="The nearest heading above the passage ('' before the first).")
    passage_id: str | None
    passage: str | None = Field(description="The passage's text: passage[start:end] == answer.")


class LibraryAnswer(Answer, Citation):
    """An answer from the library: start and end are offsets into ``passage``."""


class AskResponse(BaseModel):
    answers: list[LibraryAnswer] = Field(description="Ranked best first; 'not in these documents' in its place.")
    passages_read: int = Field(description="How many passages were retrieved and read.")
    index_version: str = Field(description="The library index version searched.")


class ErrorResponse(BaseModel):
    error: str = Field(description="What went wrong and what to do; never quotes the request's text.")


AnswerOrAnswers = Answer | list[Answer]
AnswerResponse = AnswerOrAnswers | list[AnswerOrAnswers]

_QUESTION_LIST = TypeAdapter(
    Annotated[list[AnswerRequest], Field(min_length=1, max_length=MAX_QUESTIONS_PER_REQUEST)]
)


def request_body_schema(max_context_chars: int) -> dict:
    """The JSON schema of ``/v1/answer``'s body with every bound the validator enforces."""
    one = AnswerRequest.model_json_schema()
    one["properties"]["context"]["maxLength"] = max_context_chars
    many = {"type": "array", "items": one, "minItems": 1, "maxItems": MAX_QUESTIONS_PER_REQUEST}
    return {"anyOf": [one, many]}


class InvalidRequest(ValueError):
    """The request body does not describe questions we can answer; the message says what to fix."""


def parse_questions(payload, *, max_context_chars: int) -> tuple[list[AnswerRequest], bool]:
    """``(questions, is_list)`` from a decoded JSON body, or :class:`InvalidRequest`."""
    context = {"max_context_chars": max_context_chars}
    try:
        if isinstance(payload, dict):
            return [AnswerRequest.model_validate(payload, context=context)], False
        if isinstance(payload, list):
            return _QUESTION_LIST.validate_python(payload, context=context), True
    except ValidationError as error:
        raise InvalidRequest(describe_validation_errors(error.errors())) from None
    raise InvalidRequest(
        f"the body must be a JSON object or a list, got {type(payload).__name__}; send {REQUEST_SHAPE}"
    )


SAFE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")


def safe_key(key: str) -> str:
    """A client's JSON key as an error message may name it: short identifiers only, never other text."""
    return key if SAFE_KEY.fullmatch(key) else "(a key)"


def describe_validation_errors(errors, shape: str = REQUEST_SHAPE) -> str:
    """One readable line per problem, e.g. ``[2].top_k: Input should be less than or equal to 20``; a
    key the client made up is named only when it is a short identifier."""
    problems = []
    for error in errors:
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{safe_key(str(part))}"
                        for part in error["loc"]).lstrip(".")
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        elif error["type"] == "model_type":
            message = "must be a JSON object"
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems) + f". Expected {shape}"


class ServeArgs(BaseModel):
    """Arguments of the application builder (``args:`` in the Serve config, ``key=value`` on ``serve run``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Model directory written by train_job, or any HF QA model dir / Hub name.")
    max_batch_size: int = Field(8, ge=1, description="Most questions answered in one model call.")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="How long a batch waits to fill up.")
    forward_batch_size: int = Field(FORWARD_BATCH_SIZE, ge=1, description="Windows per forward pass inside one model call.")
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
