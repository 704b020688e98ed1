"""A client's request id never reaches a log: the service mints its own, and the client's comes back
in the response alone.

Ray Serve adopts a request's ``X-Request-Id`` header as the request id: it writes it into the
proxy's and every replica's access log lines and sends it back. A client (an EHR integration, say)
could thus put a patient's name or record number into every log, and a pattern of "safe"
characters does not stop ``Smith_John_1962-03-04_MRN4471902``. :class:`ClientRequestIds`, an ASGI
middleware that Ray Serve's HTTP proxy runs before anything else (before its own
``RequestIdMiddleware``, which then mints a fresh id), takes the header out of the request, hands
the ingress only a hash of it (``X-Client-Request-Id-Hash``: the audit line's
``client_request_id_hash``, so a client can still find its request by hashing its own id), and
returns the client's id to it as ``X-Client-Request-Id`` in the response.

The proxy loads it through Ray Serve's ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, read from the
environment of each Ray node when its proxy starts: :func:`set_proxy_environment` sets it before
this project starts a local Ray, and the cluster files set it on every node (``ray start``, the
KubeRay pods, the cluster launcher). The ingress checks that the id it gets is one Serve minted
(:func:`is_minted`) and keeps any other out of the audit log.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "serve_app.request_ids:proxy_middlewares"
HEADER = b"x-request-id"
CLIENT_HEADER = b"x-client-request-id"
HASH_HEADER = b"x-client-request-id-hash"
MAX_CLIENT_ID_CHARS = 128
_MINTED = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")  # Serve's uuid4
_ECHOABLE = re.compile(r"[\x21-\x7e]{1,%d}" % MAX_CLIENT_ID_CHARS)  # printable ASCII: a valid header value
HASH_CHARS = 16

logger = logging.getLogger(__name__)


def is_minted(request_id: str | None) -> bool:
    return bool(request_id) and _MINTED.fullmatch(request_id) is not None


def client_id_hash(client_id: str) -> str:
    return hashlib.sha256(client_id.encode("utf-8", "surrogateescape")).hexdigest()[:HASH_CHARS]


def is_client_id_hash(value: str | None) -> bool:
    return bool(value) and re.fullmatch(r"[0-9a-f]{%d}" % HASH_CHARS, value) is not None


class ClientRequestIds:
    """ASGI middleware: moves a client's ``X-Request-Id`` out of the request (a hash of it goes on)
    and into the response as ``X-Client-Request-Id``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or []
        client_ids = [v.decode("latin-1") for k, v in headers if k.lower() in (HEADER, CLIENT_HEADER, HASH_HEADER)]
        kept = [(k, v) for k, v in headers if k.lower() not in (HEADER, CLIENT_HEADER, HASH_HEADER)]
        if not client_ids:
            return await self.app(scope, receive, send)
        client_id = client_ids[0]
        kept.append((HASH_HEADER, client_id_hash(client_id).encode()))

        async def send_with_client_id(message):
            if message["type"] == "http.response.start" and _ECHOABLE.fullmatch(client_id):
                message = {**message, "headers": [*message.get("headers", []), (CLIENT_HEADER, client_id.encode())]}
            await send(message)

        await self.app({**scope, "headers": kept}, receive, send_with_client_id)


def proxy_middlewares() -> list:
    """What Ray Serve's proxy calls (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): its extra middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(ClientRequestIds)]


def set_proxy_environment() -> None:
    """Make the proxies of a Ray started from this process take client request ids out (an existing
    setting is kept: a deployment may chain its own callback that returns ours too)."""
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
