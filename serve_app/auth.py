"""Bearer tokens for the API: only their SHA-256 hashes are stored, and compared in constant time.

Hashes come from a file (one per line, ``#`` comments) and/or the ``QA_TOKEN_HASHES`` environment
variable (separated by commas or whitespace); ``python -m serve_app.tokens new`` makes a token and
prints its hash. A token's id in the audit log is the first :data:`TOKEN_ID_CHARS` characters of
its hash: enough to tell clients apart, useless for signing in.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from pathlib import Path

TOKEN_HASHES_ENV = "QA_TOKEN_HASHES"
TOKEN_ID_CHARS = 8
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_token_hashes(text: str, *, source: str) -> list[str]:
    """The SHA-256 hex digests in ``text``; a ValueError names the bad entry by position only.

    The position, not the value: someone may have stored a token where its hash belongs, and this
    message reaches logs.
    """
    entries = [entry for line in text.splitlines() for entry in re.split(r"[\s,]+", line.split("#", 1)[0]) if entry]
    for position, entry in enumerate(entries, start=1):
        if not _SHA256_HEX.fullmatch(entry.lower()):
            raise ValueError(
                f"entry {position} of {source} is not a SHA-256 hex digest (64 hex characters); store the hash "
                "that `python -m serve_app.tokens new` prints, never the token itself"
            )
    return sorted({entry.lower() for entry in entries})


def load_token_hashes(hashes_file: str | None, environ=os.environ) -> list[str]:
    """The hashes of every accepted token: the file's (if given) and the environment variable's."""
    hashes = parse_token_hashes(environ.get(TOKEN_HASHES_ENV, ""), source=f"${TOKEN_HASHES_ENV}")
    if hashes_file:
        path = Path(hashes_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"token hashes file {str(path)!r} does not exist")
        hashes += parse_token_hashes(path.read_text(encoding="utf-8"), source=str(path))
    return sorted(set(hashes))


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TokenChecker:
    """Which known token, if any, an ``Authorization`` header carries."""

    def __init__(self, token_hashes: list[str]):
        self._digests = [bytes.fromhex(h) for h in token_hashes]

    def token_id(self, authorization: str | None) -> str | None:
        """The token's id (its hash prefix) when the header holds a known bearer token, else None."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        presented = hashlib.sha256(token.strip().encode("utf-8")).digest()
        # Compare with every known hash, without stopping at a match: the time taken says nothing
        # about which token (or how much of one) was right.
        matched = None
        for digest in self._digests:
            if hmac.compare_digest(presented, digest):
                matched = digest
        return None if matched is None else matched.hex()[:TOKEN_ID_CHARS]
