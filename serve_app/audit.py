"""The ingress's audit trail and request metrics (one of each per ingress process).

The audit log gets one JSON line per HTTP request: when, which request (the id the service minted,
and a hash of the client's own id if it sent one) and token (the token's id, a prefix of its hash), which route, the status, the latency, how many questions and model windows,
the model version that answered (during an update, the one of the replica that did; else the
version the ingress serves) and how many questions got no answer; for feedback, the stored record's id and
the verdict. Never a question, a context, an answer or feedback's words.
The same events feed Prometheus metrics through ``ray.serve.metrics`` (Ray exports them on each
node's metrics export port).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from datetime import datetime, timezone

from ray.serve.metrics import Counter

from serve_app import request_ids

AUDIT_LOGGER = "serve_app.audit"
logger = logging.getLogger(__name__)


class RequestLog:
    """Where the ingress writes its audit lines and counts its requests."""

    def __init__(self, audit_log: str | None, model_version: str):
        self.model_version = model_version  # what requests no model answered are recorded with
        self.logger = logging.getLogger(AUDIT_LOGGER)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False  # not into Serve's replica log: this trail has its own format
        for handler in list(self.logger.handlers):
            self.logger.removeHandler(handler)
        handler = logging.FileHandler(audit_log, encoding="utf-8") if audit_log else logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        self.logger.addHandler(handler)
        self.requests = Counter("qa_requests", "HTTP requests by route and status.", tag_keys=("route", "status"))
        self.questions = Counter("qa_questions", "Questions accepted for answering.")
        self.rejections = Counter(
            "qa_rejections", "Requests turned away with 503: queue full, deadline passed, replica lost.",
            tag_keys=("reason",),
        )
        self.abstentions = Counter("qa_abstentions", "Questions answered with no answer (empty span).")
        self.rated = Counter("qa_rated_answers", "Answers rated through /v1/feedback, by the model version that gave "
                             "them and the verdict.", tag_keys=("model_version", "verdict"))

    def record(self, *, request_id: str, token_id: str | None, route: str, status: int, latency_s: float,
               questions: int, windows: int, abstained: int, model_version: str | None = None,
               passages: int | None = None, index_version: str | None = None,
               client_request_id_hash: str | None = None, feedback_id: int | None = None,
               verdict: str | None = None) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        if abstained:
            self.abstentions.inc(abstained)
        self.logger.info(json.dumps({
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "request_id": request_id,
            **({"client_request_id_hash": client_request_id_hash} if client_request_id_hash else {}),
            "token_id": token_id,
            "route": route,
            "status": status,
            "latency_ms": round(1000 * latency_s, 1),
            "questions": questions,
            "windows": windows,
            "model_version": model_version or self.model_version,
            "abstained": abstained,
            # /v1/ask: how many library passages were read, and from which index version
            **({"passages": passages, "index_version": index_version} if index_version else {}),
            # /v1/feedback: which stored record, and the verdict (never the question or the words)
            **({"feedback_id": feedback_id, "verdict": verdict} if feedback_id is not None else {}),
        }))


_request_log: RequestLog | None = None  # this process's ingress's; set by configure()


def configure(audit_log: str | None, model_version: str) -> RequestLog:
    """Set up this process's audit log and metrics (the ingress calls this when it starts)."""
    global _request_log
    _request_log = RequestLog(audit_log, model_version)
    return _request_log


async def audit_requests(request, call_next):
    """HTTP middleware: one audit line per request, whatever happens to it (a crash is a 500).

    Routes fill in ``request.state.audit`` (token id, questions, windows, abstained, model version) as they go.
    """
    started = time.monotonic()
    client_hash = request.headers.get(request_ids.HASH_HEADER.decode())
    request.state.audit = {"token_id": None, "questions": 0, "windows": 0, "abstained": 0,
                           "client_request_id_hash": client_hash if request_ids.is_client_id_hash(client_hash) else None}
    status = 500
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        if _request_log is not None:
            route = getattr(request.scope.get("route"), "path", None) or "unmatched"
            _request_log.record(
                request_id=_serve_request_id() or uuid.uuid4().hex, route=route, status=status,
                latency_s=time.monotonic() - started, **request.state.audit,
            )


def _serve_request_id() -> str | None:
    """The id Ray Serve minted for this request (it also sends it back as the X-Request-Id header);
    None when it is a client's, which only a proxy started without our middleware lets through
    (:mod:`serve_app.request_ids`): that text stays out of the audit log."""
    from ray.serve.context import _get_serve_request_context

    request_id = _get_serve_request_context().request_id
    if request_id and not request_ids.is_minted(request_id):
        global _warned_unsafe_id
        if not _warned_unsafe_id:
            _warned_unsafe_id = True
            logger.warning("a client-chosen request id reached the ingress: Ray Serve's proxy runs without "
                           "%s=%s on this node, so its access logs keep such ids; set it where the Ray nodes start",
                           request_ids.PROXY_CALLBACK_ENV, request_ids.PROXY_CALLBACK)
        return None
    return request_id


_warned_unsafe_id = False
