"""Receipts: what the service showed, signed, so feedback can refer only to answers it really gave.

Every answer response of a service that keeps feedback carries ``X-Response-Id``: one receipt per
question (comma-separated for a list of questions, up to 12 KiB in all). A receipt names the route, the model and index
versions, the passages read (the library's passage ids; for ``/v1/answer`` the context itself,
by a keyed hash) and the ranked answers shown (passage, start, end), with a keyed hash of the
question, under an HMAC-SHA256 tag with the service's key. ``POST /v1/feedback`` sends it back with
the question (and the context, for ``/v1/answer``); the service checks the tag and the hashes, so a
client cannot attach a verdict or a correction to text the service never showed, and the service
stores nothing about an answer until someone rates it. Hashes are keyed so that a receipt tells
nothing about its text to someone who sees it without the key.

The key is ``$QA_FEEDBACK_KEY`` (64 hex characters: a Kubernetes Secret on a cluster, where the
ingress need not run beside the store) or else 32 random bytes in the feedback folder
(``receipt.key``, 0600), made when the service first starts with that folder.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from serve_app.feedback.store import create_private_file

KEY_FILE = "receipt.key"
KEY_ENV = "QA_FEEDBACK_KEY"
RECEIPT_HEADER = "X-Response-Id"
MAX_RECEIPT_CHARS = 8192
# A response's receipts together: a list of many questions with many answers each gets none (ask
# such questions one by one to rate them), as HTTP clients refuse longer headers.
MAX_RECEIPTS_HEADER = 12_288
ROUTES = ("answer", "ask")
TEXT_HASH_CHARS = 32


class ReceiptError(ValueError):
    """A receipt this service did not issue, or that does not match the text sent with it."""


def load_or_create_key(folder: str | Path, environ=os.environ) -> bytes:
    """The service's receipt key: ``$QA_FEEDBACK_KEY``, else the folder's, made (32 random bytes,
    0600) when it has none."""
    if environ.get(KEY_ENV):
        try:
            key = bytes.fromhex(environ[KEY_ENV].strip())
        except ValueError:
            key = b""
        if len(key) != 32:
            raise ValueError(f"${KEY_ENV} must be 64 hex characters (make one with `openssl rand -hex 32`)")
        return key
    path = Path(folder) / KEY_FILE
    if not path.exists():
        partial = path.with_name(f"{KEY_FILE}.{secrets.token_hex(8)}")
        create_private_file(partial)
        partial.write_bytes(secrets.token_bytes(32))
        try:
            os.link(partial, path)  # the first to link wins: replicas starting at once agree on one key
        except FileExistsError:
            pass
        finally:
            partial.unlink()
    key = path.read_bytes()
    if len(key) != 32:
        raise ValueError(f"{path} is not a receipt key (32 bytes); delete it to make a new one (feedback on answers "
                         "given before then is refused)")
    return key


def text_hash(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:TEXT_HASH_CHARS]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Receipt:
    """What one question's answer showed: ``passages`` are passage ids (``ask``) or the context's
    keyed hash (``answer``); ``answers`` the ranked (passage index or -1 for "not in these
    documents", start, end) shown; ``question`` the question's keyed hash."""

    route: str
    model_version: str
    index_version: str | None
    question: str
    passages: tuple[str, ...]
    answers: tuple[tuple[int, int, int], ...]

    def sign(self, key: bytes) -> str:
        payload = _b64(json.dumps([self.route, self.model_version, self.index_version, self.question,
                                   list(self.passages), [list(a) for a in self.answers]],
                                  separators=(",", ":")).encode("utf-8"))
        return f"{payload}.{_b64(hmac.new(key, payload.encode('ascii'), hashlib.sha256).digest())}"


def issue(key: bytes, route: str, model_version: str, index_version: str | None, question: str,
          passages: list[str], answers: list[dict]) -> str:
    """The signed receipt of one question's answers (``answers`` as the service returns them, with
    ``passage`` the index into ``passages`` for the library; 0 for a context)."""
    shown = tuple((answer.get("passage", 0) if answer["start"] >= 0 else -1, answer["start"], answer["end"])
                  for answer in answers)
    ids = tuple(passages) if route == "ask" else tuple(text_hash(key, context) for context in passages)
    return Receipt(route, model_version, index_version, text_hash(key, question), ids, shown).sign(key)


def verify(key: bytes, receipt: str) -> Receipt:
    """The receipt's content when this service (this key) issued it; :class:`ReceiptError` otherwise."""
    payload, _, tag = receipt.partition(".")
    try:
        expected = hmac.new(key, payload.encode("ascii"), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(tag)):
            raise ReceiptError
        route, model_version, index_version, question, passages, answers = json.loads(_unb64(payload))
        return Receipt(route, model_version, index_version, question, tuple(passages),
                       tuple((int(p), int(s), int(e)) for p, s, e in answers))
    except (ValueError, TypeError, UnicodeError):
        raise ReceiptError("response_id is not one this service issued: send the X-Response-Id header of the "
                           "answer being rated, unchanged") from None
