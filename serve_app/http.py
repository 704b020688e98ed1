"""HTTP helpers of the ingress: reading a bounded body, decoding JSON, the error responses and their schema."""

import json
import re

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from serve_app.schemas import REQUEST_SHAPE, ErrorResponse


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes before reading it all."""
    too_large = HTTPException(
        413, f"the request body is larger than this service's limit of {limit:,} bytes; "
        "send a shorter context or split the questions over several requests",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def decode_json(body: bytes):
    if not body.strip():
        raise HTTPException(400, f"the request body is empty; send {REQUEST_SHAPE}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise HTTPException(
            400, f"the request body is not UTF-8 text (byte {body[error.start]:#04x} at offset {error.start}); "
            "send JSON encoded as UTF-8",
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise HTTPException(
            400, f"the request body is not valid JSON (line {error.lineno} column {error.colno}: {error.msg}); "
            f"send {REQUEST_SHAPE}",
        ) from None
    except RecursionError:
        raise HTTPException(400, f"the request body nests JSON arrays or objects too deeply; send {REQUEST_SHAPE}") from None
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise HTTPException(400, f"the request body holds a number too long to read; send {REQUEST_SHAPE}") from None


def busy(retry_after_s: int, why: str) -> HTTPException:
    return HTTPException(
        503, f"the service is busy ({why}); try again in {retry_after_s} s", headers={"Retry-After": str(retry_after_s)}
    )


UNAUTHORIZED = {"WWW-Authenticate": 'Bearer realm="qa"'}
ERROR_RESPONSES = {
    400: {"description": "The body is not JSON (empty, not UTF-8, malformed, nested too deeply)."},
    401: {
        "description": "No valid bearer token: send `Authorization: Bearer TOKEN`.",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
    },
    403: {"description": "Feedback whose response_id, question or context is not what this service answered."},
    404: {"description": "This service has no document library (start it with --library LIBRARY), or keeps no "
                         "feedback (start it with --feedback DIR)."},
    409: {"description": "The library no longer holds the passages of the answer being rated: ask again."},
    413: {"description": "The body is over the byte limit, or its questions need more model windows than the "
                         "per-request budget (see /v1/model): send shorter documents or fewer questions."},
    422: {"description": "JSON that does not match the request schema; the message names each field to fix."},
    503: {
        "description": "Busy: the model's queue is full, or the answer did not come within the deadline.",
        "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait before retrying."}},
    },
    500: {"description": "The service failed; the request may be retried."},
}


def error_responses(*codes: int) -> dict:
    return {code: {**ERROR_RESPONSES[code], "model": ErrorResponse} for code in codes}


SAFE_PATH = re.compile(r"/[A-Za-z0-9/_.-]{0,63}")


async def error_as_json(request: Request, error: HTTPException) -> JSONResponse:
    message = error.detail
    if error.status_code == 404 and message == "Not Found":  # Starlette's own: no route matched
        path = request.url.path
        shown = f" {path!r}" if SAFE_PATH.fullmatch(path) else ""  # never echo other text a client sent
        message = f"no such path{shown}; the API is described at /docs"
    return JSONResponse({"error": message}, status_code=error.status_code, headers=error.headers)


async def crash_as_json(request: Request, error: Exception) -> JSONResponse:
    return JSONResponse(
        {"error": f"the service failed to answer ({type(error).__name__}); try again, or see the Serve logs"},
        status_code=500,
    )
