"""The HTTP API's request and response shapes and their bounds."""

import re
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from qa_common.library.index import NAME_PATTERN

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


class Source(BaseModel):
    """Where a passage of the library is."""

    collection: str | None
    document: str | None = Field(description="The document's path inside its collection's folder.")
    page: int | None = Field(description="1-based page of a PDF; null for formats without pages.")
    section: str | None = Field(description="The nearest heading above the passage ('' before the first).")
    passage_id: str | None


class Citation(Source):
    """Where a library answer comes from; all null for 'not in these documents'."""

    passage: str | None = Field(description="The passage's text: passage[start:end] == answer.")


class LibraryAnswer(Answer, Citation):
    """An answer from the library: start and end are offsets into ``passage``."""


class AskResponse(BaseModel):
    answers: list[LibraryAnswer] = Field(description="Ranked best first; 'not in these documents' in its place.")
    passages_read: int = Field(description="How many passages were retrieved and read.")
    sources: list[Source] = Field(description="The passages read, the one the reader finds an answer in most "
                                  "strongly first (its best span against its 'no answer'), whether or not an answer "
                                  "comes from it: where else to read.")
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
