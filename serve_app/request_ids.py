"""Client-chosen request ids never reach a log unless they are short safe ids.

Ray Serve adopts a request's ``X-Request-Id`` header as the request id: it writes it into the
proxy's and every replica's access log lines and sends it back. A client (an EHR integration, say)
could thus put a patient's name or record number into every log. :class:`SafeRequestIds`, an ASGI
middleware that Ray Serve's HTTP proxy runs before anything else (before its own
``RequestIdMiddleware``, which then gives the request a fresh id), drops the header unless it
matches :data:`SAFE_REQUEST_ID`.

The proxy loads it through Ray Serve's ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, read from the
environment of each Ray node when its proxy starts: :func:`set_proxy_environment` sets it before
this project starts a local Ray, and the cluster files set it on every node (``ray start``, the
KubeRay pods, the cluster launcher). The ingress checks what arrives (:func:`is_safe`) and keeps an
unsafe id out of the audit log too.
"""

from __future__ import annotations

import logging
import os
import re

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "serve_app.request_ids:proxy_middlewares"
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
HEADER = b"x-request-id"

logger = logging.getLogger(__name__)


def is_safe(request_id: str | None) -> bool:
    return bool(request_id) and SAFE_REQUEST_ID.fullmatch(request_id) is not None


class SafeRequestIds:
    """ASGI middleware: removes an ``X-Request-Id`` header that is not a short safe id."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") in ("http", "websocket"):
            headers = scope.get("headers") or []
            kept = [(k, v) for k, v in headers if k.lower() != HEADER or is_safe(v.decode("latin-1"))]
            if len(kept) != len(headers):
                scope = {**scope, "headers": kept}
        await self.app(scope, receive, send)


def proxy_middlewares() -> list:
    """What Ray Serve's proxy calls (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): its extra middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(SafeRequestIds)]


def set_proxy_environment() -> None:
    """Make the proxies of a Ray started from this process drop unsafe request ids (an existing
    setting is kept: a deployment may chain its own callback that returns ours too)."""
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
