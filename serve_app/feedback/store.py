"""The clinicians' feedback, kept in one SQLite file that holds patient text.

One deployment owns the store (SQLite allows one writer); the operator's commands
(``python -m serve_app.feedback``) open the same file where it lives. What it promises:

- **Private.** The folder is created 0700 and the database 0600 before SQLite first opens it (SQLite
  gives its WAL and shared-memory files the database's mode). Nothing in a row is ever logged; the
  errors this module raises name fields and limits, never their values.
- **Durable.** WAL with ``synchronous=FULL``: :meth:`FeedbackStore.add` returns only after its
  transaction is on disk, so a service killed mid-write keeps every acknowledged record and none
  half-written (SQLite's atomic commit).
- **Deletable.** ``secure_delete`` overwrites deleted rows in the file, and every deletion ends with
  a WAL checkpoint that truncates the log, so deleted text is gone from disk, not only from queries.
- **Idempotent.** A record is keyed by the giver's token id and a client key (a hash of the
  client's idempotency key): posting it again returns the first record's id and changes nothing.

Who gave feedback is a token id (a prefix of the token's hash, as in the audit log), never a name.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from serve_app.schemas import MAX_PASSAGES  # a rating refers to at most what /v1/ask reads

STORE_FILE = "feedback.sqlite3"
VERDICTS = ("right", "wrong", "not_in_documents")
MAX_TEXT_CHARS = 100_000  # a question or one passage (a /v1/answer context can be this long)
MAX_ID_CHARS = 200  # passage, document, version and key ids

SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY,
    created_at REAL NOT NULL,          -- seconds since the epoch, UTC
    token_id TEXT NOT NULL,
    client_key TEXT NOT NULL,
    verdict TEXT NOT NULL CHECK (verdict IN ('right', 'wrong', 'not_in_documents')),
    model_version TEXT NOT NULL,
    index_version TEXT,                -- NULL for /v1/answer (a context the client sent)
    question TEXT NOT NULL,
    passages TEXT NOT NULL,            -- JSON list of {passage_id, document, text}: what was shown
    shown TEXT,                        -- JSON {passage, start, end} of the answer shown; NULL: none was
    correction TEXT,                   -- JSON {passage, start, end}: the right words, for 'wrong'
    UNIQUE (token_id, client_key)
);
CREATE INDEX IF NOT EXISTS feedback_created ON feedback (created_at);
CREATE INDEX IF NOT EXISTS feedback_model ON feedback (model_version);
"""


class FeedbackError(ValueError):
    """A feedback record that cannot be stored as given (the message names the field, not its text)."""


@dataclass(frozen=True)
class Passage:
    """A passage the service showed: the library's passage id and document (for /v1/answer, the
    context's hash stands for both), and its text."""

    passage_id: str
    document: str
    text: str


@dataclass(frozen=True)
class Span:
    """Characters ``start:end`` of ``passages[passage]``."""

    passage: int
    start: int
    end: int


@dataclass(frozen=True)
class Feedback:
    """One verdict on one answer the service gave: ``shown`` is the answer (None when it said "not
    in these documents"), ``correction`` the right words when the verdict is ``wrong`` and the
    clinician selected them."""

    token_id: str
    client_key: str
    verdict: str
    model_version: str
    index_version: str | None
    question: str
    passages: tuple[Passage, ...]
    shown: Span | None = None
    correction: Span | None = None
    id: int | None = None  # set once stored
    created_at: float | None = None

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise FeedbackError(f"verdict must be one of {', '.join(VERDICTS)}")
        for name in ("token_id", "client_key", "model_version", "index_version"):
            value = getattr(self, name)
            if value is not None and not (0 < len(value) <= MAX_ID_CHARS):
                raise FeedbackError(f"{name} must be 1-{MAX_ID_CHARS} characters")
        if not (0 < len(self.question.strip()) and len(self.question) <= MAX_TEXT_CHARS):
            raise FeedbackError(f"question must be 1-{MAX_TEXT_CHARS:,} characters")
        if not (1 <= len(self.passages) <= MAX_PASSAGES):
            raise FeedbackError(f"feedback refers to 1-{MAX_PASSAGES} passages")
        for passage in self.passages:
            if len(passage.text) > MAX_TEXT_CHARS or not (0 < len(passage.passage_id) <= MAX_ID_CHARS) \
                    or not (0 < len(passage.document) <= MAX_ID_CHARS):
                raise FeedbackError(f"a passage's text must be at most {MAX_TEXT_CHARS:,} characters and its "
                                    f"ids 1-{MAX_ID_CHARS}")
        for name in ("shown", "correction"):
            span = getattr(self, name)
            if span is not None and not (0 <= span.passage < len(self.passages)
                                         and 0 <= span.start < span.end <= len(self.passages[span.passage].text)):
                raise FeedbackError(f"{name} must be a non-empty span of one of the passages shown")
        if self.correction is not None and self.verdict != "wrong":
            raise FeedbackError("a correction goes with the verdict 'wrong' only")
        if self.verdict == "right" and self.shown is None:
            raise FeedbackError("'right' needs the answer that was shown; for a right 'not in these documents' "
                                "send not_in_documents")

    @property
    def documents(self) -> list[str]:
        return [passage.document for passage in self.passages]


def _span(text: str | None) -> Span | None:
    return Span(**json.loads(text)) if text else None


def _record(row: sqlite3.Row) -> Feedback:
    return Feedback(
        token_id=row["token_id"], client_key=row["client_key"], verdict=row["verdict"],
        model_version=row["model_version"], index_version=row["index_version"], question=row["question"],
        passages=tuple(Passage(**p) for p in json.loads(row["passages"])),
        shown=_span(row["shown"]), correction=_span(row["correction"]), id=row["id"], created_at=row["created_at"],
    )


def create_private_file(path: Path) -> None:
    """Create ``path`` (and its folder, 0700) with mode 0600 unless it exists: before SQLite opens it,
    so the file holding patient text is never readable by others, not even for a moment."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


class FeedbackStore:
    """The feedback database in ``folder`` (created if missing): one connection, used by one thread at a time."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / STORE_FILE
        create_private_file(self.path)
        # Transactions explicit; any one thread at a time (the keeper serialises its calls, from a thread pool).
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA secure_delete=ON")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, feedback: Feedback, *, now: float | None = None) -> tuple[int, bool]:
        """Store ``feedback``; (its id, True), or (the id stored before, False) when its token id and
        client key were seen already."""
        with self.transaction():
            cursor = self.db.execute(
                "INSERT INTO feedback (created_at, token_id, client_key, verdict, model_version, index_version, "
                "question, passages, shown, correction) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (token_id, client_key) DO NOTHING",
                (time.time() if now is None else now, feedback.token_id, feedback.client_key, feedback.verdict,
                 feedback.model_version, feedback.index_version, feedback.question,
                 json.dumps([asdict(p) for p in feedback.passages]),
                 json.dumps(asdict(feedback.shown)) if feedback.shown else None,
                 json.dumps(asdict(feedback.correction)) if feedback.correction else None),
            )
            if cursor.rowcount == 1:
                return cursor.lastrowid, True
            [stored] = self.db.execute("SELECT id FROM feedback WHERE token_id = ? AND client_key = ?",
                                       (feedback.token_id, feedback.client_key)).fetchone()
            return stored, False

    def records(self) -> Iterator[Feedback]:
        """Every record, oldest first."""
        for row in self.db.execute("SELECT * FROM feedback ORDER BY created_at, id"):
            yield _record(row)

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM feedback").fetchone()[0]

    def verdicts_by_model(self) -> dict[str, Counter]:
        """{model version: Counter of verdicts} over every stored record."""
        rated: dict[str, Counter] = {}
        for version, verdict, n in self.db.execute(
                "SELECT model_version, verdict, count(*) FROM feedback GROUP BY model_version, verdict"):
            rated.setdefault(version, Counter())[verdict] = n
        return rated

    def delete(self, *, ids: Sequence[int] = (), before: datetime | None = None) -> int:
        """Delete the records with these ids and/or those given before ``before``; how many went.
        The deleted text is overwritten in the file and the WAL truncated."""
        with self.transaction():
            deleted = 0
            for start in range(0, len(ids), 500):
                chunk = list(ids[start:start + 500])
                deleted += self.db.execute(f"DELETE FROM feedback WHERE id IN ({','.join('?' * len(chunk))})",
                                           chunk).rowcount
            if before is not None:
                deleted += self.db.execute("DELETE FROM feedback WHERE created_at < ?",
                                           (before.astimezone(timezone.utc).timestamp(),)).rowcount
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return deleted

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on an exception): one writer at a time."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
