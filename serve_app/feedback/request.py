"""``POST /v1/feedback``'s body, and how it becomes a stored record."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_app.feedback.receipts import MAX_RECEIPT_CHARS, Receipt, ReceiptError, text_hash, verify
from serve_app.feedback.store import VERDICTS, Feedback, FeedbackError, Passage, Span
from serve_app.schemas import MAX_PASSAGES, MAX_QUESTION_CHARS, MAX_TOP_K, parse_object

MAX_KEY_CHARS = 128
NO_TOKEN = "no-token"  # the giver of feedback to a service that runs without tokens (on loopback only)
FEEDBACK_SHAPE = (f'{{"response_id": str (the answer\'s X-Response-Id), "question": str, "context"?: str (for '
                  f'/v1/answer), "verdict": {" | ".join(VERDICTS)}, "answer"?: int 0-{MAX_TOP_K - 1} (which of the '
                  f'answers shown, default 0), "correction"?: {{"passage"?: int, "start": int, "end": int}} (the right '
                  f'words, for wrong), "key": str 1-{MAX_KEY_CHARS} (sending the same key again changes nothing)}}')


class Correction(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    passage: int | None = Field(None, ge=0, lt=MAX_PASSAGES, description="Which passage read (default: the rated "
                                "answer's; for /v1/answer the context, 0).")
    start: int = Field(ge=0, description="Start offset of the right words in that passage (characters).")
    end: int = Field(ge=1, description="End offset (exclusive).")


class FeedbackRequest(BaseModel):
    """A verdict on one answer the service gave, named by its receipt."""

    model_config = ConfigDict(strict=True, extra="forbid")

    response_id: str = Field(min_length=1, max_length=MAX_RECEIPT_CHARS)
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    context: str | None = Field(None, min_length=1, description="The context the question was asked about "
                                "(/v1/answer only).")
    verdict: Literal[VERDICTS]
    answer: int = Field(0, ge=0, lt=MAX_TOP_K, description="Which of the ranked answers shown is rated.")
    correction: Correction | None = None
    key: str = Field(min_length=1, max_length=MAX_KEY_CHARS, description="The client's idempotency key.")


def parse_feedback(payload) -> FeedbackRequest:
    """The rating in a decoded JSON body, or :class:`InvalidRequest`."""
    return parse_object(payload, FeedbackRequest, FEEDBACK_SHAPE)


class PassagesGone(LookupError):
    """The library no longer holds a passage the rated answer came from."""


def feedback_from(request: FeedbackRequest, key: bytes, token_id: str | None,
                  library_passages: Callable[[Sequence[str]], list[dict]] | None) -> Feedback:
    """The record to store, once the receipt and the text sent with it match what the service
    showed. Raises :class:`ReceiptError` (it does not), :class:`FeedbackError` (a span outside the
    passages, a verdict that does not fit) or :class:`PassagesGone`."""
    receipt: Receipt = verify(key, request.response_id)
    if text_hash(key, request.question) != receipt.question:
        raise ReceiptError("question is not the question of that response_id: send it exactly as it was asked")
    if request.answer >= len(receipt.answers):
        raise FeedbackError(f"answer {request.answer} was not shown: that response had {len(receipt.answers)}")
    if receipt.route == "answer":
        if request.context is None or text_hash(key, request.context) != receipt.passages[0]:
            raise ReceiptError("context must be the context of that /v1/answer response, exactly as it was sent")
        passages = (Passage(f"context-{receipt.passages[0]}", f"context-{receipt.passages[0]}", request.context),)
    else:
        if request.context is not None:
            raise FeedbackError("context goes with feedback on /v1/answer only; a /v1/ask answer's passages are "
                                "the library's")
        if library_passages is None:
            raise PassagesGone("this service has no document library now")
        found = {p["passage_id"]: p for p in library_passages(receipt.passages)}
        if set(found) != set(receipt.passages):
            raise PassagesGone("the library no longer holds the passages of that answer (its documents changed)")
        passages = tuple(Passage(i, found[i]["document"], found[i]["text"]) for i in receipt.passages)
    passage, start, end = receipt.answers[request.answer]
    shown = Span(passage, start, end) if passage >= 0 else None
    correction = None
    if request.correction is not None:
        fix = request.correction
        correction = Span(fix.passage if fix.passage is not None else max(passage, 0), fix.start, fix.end)
    return Feedback(token_id=token_id or NO_TOKEN, client_key=text_hash(key, request.key), verdict=request.verdict,
                    model_version=receipt.model_version, index_version=receipt.index_version,
                    question=request.question, passages=passages, shown=shown, correction=correction)
