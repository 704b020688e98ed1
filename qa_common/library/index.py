"""A document library's index on disk: the one module that reads and writes its layout.

    LIBRARY/CURRENT                  the name of the version being served (replaced atomically, durably)
    LIBRARY/.lock                    held by the build that is running (one at a time)
    LIBRARY/build-report.json        the last build's files that could not be read or were skipped, with why
    LIBRARY/<version>/.qa-library-version   marks a folder a build wrote (only such folders are ever deleted)
    LIBRARY/<version>/passages.lance one LanceDB table: a row per passage (PASSAGE_SCHEMA + its vectors), indexed
    LIBRARY/<version>/manifest.json  the version's :class:`Manifest`: embedder, documents, unreadable files

A build writes a new version beside the served one and switches ``CURRENT`` only once it is
complete, so a reader never sees half an index; the previous version is kept for readers that
still have it open, older ones are removed, and so are versions a killed build left unpublished.
A folder that holds anything else is not a library, and nothing is written to it. Everything here
holds patient text or document names: the folder is 0700 and its files 0600, and nothing here
returns a name except to the library's own builder (the report) and to an answer's citation.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

CURRENT_FILE = "CURRENT"
LOCK_FILE = ".lock"
REPORT_FILE = "build-report.json"
MANIFEST_FILE = "manifest.json"
VERSION_MARKER = ".qa-library-version"
VERSION_PATTERN = re.compile(r"v\d{8}T\d{12}Z")
TABLE = "passages"
# What a citation names, then the passage's text: the rows' columns, in order, as search returns them.
CITATION_FIELDS = ("passage_id", "collection", "document", "page", "section")
PASSAGE_COLUMNS = (*CITATION_FIELDS, "text")
# The passage's unit vector, then its sentences' (qa_common.library.embedding.Embedder.embed_passages):
# one LanceDB multivector column, so a dense search scores a passage by the best of them.
VECTORS = "vectors"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a collection's name
BUILD_COMMAND = "python -m library_job build DOCS_DIR --library LIBRARY"


class LibraryError(ValueError):
    """The index is missing or unusable; the message says what to run."""


def passage_schema(dimension: int):
    """The Arrow schema of a version's table: the passage columns, the document's content hash, the vectors."""
    import pyarrow as pa

    types = {"page": pa.int32()}
    return pa.schema([(name, types.get(name, pa.string())) for name in PASSAGE_COLUMNS]
                     + [("sha256", pa.string()), (VECTORS, pa.list_(pa.list_(pa.float32(), dimension)))])


def vectors_column(vectors: list):
    """:data:`VECTORS`'s Arrow column from each passage's (1 + sentences) x dimension array."""
    import numpy as np
    import pyarrow as pa

    flat = pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(vectors).ravel()), vectors[0].shape[1])
    return pa.ListArray.from_arrays(pa.array(np.cumsum([0] + [len(v) for v in vectors]), pa.int32()), flat)


def check_collection_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"collection name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting "
                         "with a letter or digit")
    return name


def document_key(collection: str, document: str) -> str:
    """A document's key in the manifest: unique across the collections of one index."""
    return f"{collection}/{document}"


def passage_id(collection: str, document: str, sha256: str, number: int) -> str:
    """Stable while the document's content is: a rebuild keeps an unchanged document's ids."""
    key = hashlib.sha256(f"{document_key(collection, document)}/{sha256}".encode()).hexdigest()[:16]
    return f"{key}-{number:05d}"


@dataclass(frozen=True)
class IndexedDocument:
    collection: str
    document: str  # its path inside the collection's folder, as citations name it
    sha256: str
    passages: int = 0


@dataclass(frozen=True)
class FailedDocument:
    collection: str
    document: str
    sha256: str
    reason: str  # never quotes the document's text


@dataclass
class Manifest:
    """What one version of the index holds; ``documents`` and ``failed`` are keyed by :func:`document_key`."""

    version: str
    embedder: str
    max_passage_words: int
    built_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    documents: dict[str, IndexedDocument] = field(default_factory=dict)
    failed: dict[str, FailedDocument] = field(default_factory=dict)

    @property
    def collections(self) -> dict[str, dict[str, int]]:
        """``{collection: {"documents": n, "passages": n}}``."""
        totals: dict[str, dict[str, int]] = {}
        for doc in self.documents.values():
            counts = totals.setdefault(doc.collection, {"documents": 0, "passages": 0})
            counts["documents"] += 1
            counts["passages"] += doc.passages
        return totals

    def summary(self) -> list[dict]:
        """What ``GET /v1/collections`` shows: names and counts, never a path."""
        return [{"name": name, **counts} for name, counts in sorted(self.collections.items())]

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "collections": self.collections}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        data.pop("collections", None)  # derived
        data["documents"] = {key: IndexedDocument(**doc) for key, doc in data.get("documents", {}).items()}
        data["failed"] = {key: FailedDocument(**doc) for key, doc in data.get("failed", {}).items()}
        return cls(**data)


def new_version_name() -> str:
    return datetime.now(timezone.utc).strftime("v%Y%m%dT%H%M%S%fZ")


def _is_library_entry(path: Path) -> bool:
    name = path.name
    return (name in (CURRENT_FILE, LOCK_FILE, REPORT_FILE) or name.startswith(f".{CURRENT_FILE}.")
            or (VERSION_PATTERN.fullmatch(name) is not None and path.is_dir()))


def _built_versions(library: Path) -> list[Path]:
    """The version folders a build wrote (name and marker): the only folders ever deleted."""
    return [path for path in library.iterdir() if VERSION_PATTERN.fullmatch(path.name) and path.is_dir()
            and not path.is_symlink() and (path / VERSION_MARKER).is_file()]


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner alone (0600), and make it durable."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.chmod(path, 0o600)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def build_lock(library: Path) -> Iterator[None]:
    """Create ``library`` (0700) if need be and hold its build lock; LibraryError when it is not a
    library's folder or another build holds the lock. Versions a killed build left unpublished are
    removed on the way in."""
    if library.exists():
        if not library.is_dir() or library.is_symlink():
            raise LibraryError(f"--library {library}: not a folder; give a new or empty folder for the library")
        strangers = sorted(path.name for path in library.iterdir() if not _is_library_entry(path))
        if strangers:
            raise LibraryError(f"--library {library} holds {len(strangers)} entries that are not a library's "
                               f"(such as {strangers[0]!r}): nothing was written. Give a new or empty folder, "
                               "or the folder of an existing library")
    library.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(library / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LibraryError(f"another build of {library} is running; wait for it to finish") from None
        served = current_version(library)
        for orphan in _built_versions(library):
            if orphan.name != served and not (orphan / MANIFEST_FILE).is_file():
                shutil.rmtree(orphan, ignore_errors=True)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def new_version(library: Path) -> str:
    """A new, marked version folder in ``library`` (hold :func:`build_lock`)."""
    version = new_version_name()
    (library / version).mkdir(mode=0o700)
    write_private(library / version / VERSION_MARKER, "")
    return version


def current_version(library: Path) -> str | None:
    try:
        return (library / CURRENT_FILE).read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def read_manifest(library: Path, version: str | None = None) -> Manifest:
    """The manifest of ``version`` (default: the one being served)."""
    version = version or current_version(library)
    if version is None:
        raise LibraryError(f"no library index at {library}: build one with `{BUILD_COMMAND}`")
    return Manifest.from_json((library / version / MANIFEST_FILE).read_text(encoding="utf-8"))


def plan_build(documents: list[dict], previous: Manifest | None, collection: str) -> dict:
    """Which of ``collection``'s listed ``documents`` (``document``, ``sha256``) to read, which to keep
    as they are, which were changed or removed.

    A document is kept when the previous version holds it with the same content hash (also one
    that could not be read then: it is reported again, not read again)."""
    old = {key: doc for table in (previous.documents, previous.failed) for key, doc in table.items()
           if doc.collection == collection} if previous else {}
    new = {document_key(collection, doc["document"]): doc for doc in documents}
    kept = {key for key, doc in new.items() if key in old and old[key].sha256 == doc["sha256"]}
    return {"read": [doc for key, doc in new.items() if key not in kept], "kept": kept,
            "changed": sum(key in old for key in new if key not in kept), "removed": sorted(set(old) - set(new))}


def open_table(library: Path, version: str):
    """The version's LanceDB table, None for a library with no passages. A table without
    :data:`VECTORS` (built before passages had sentence vectors) is a LibraryError: it must be rebuilt."""
    import lancedb

    database = lancedb.connect(str(library / version))
    table = database.open_table(TABLE) if TABLE in database.table_names() else None
    if table is not None and VECTORS not in table.schema.names:
        raise LibraryError(f"{library} was built by an earlier release, without sentence vectors: build the "
                           f"documents again into a new folder ({BUILD_COMMAND} with a new LIBRARY) and serve that")
    return table


def index_table(table) -> None:
    """A version's two search indexes: BM25 over the text, and an IVF_FLAT index of :data:`VECTORS`.
    Without the vector index LanceDB reads and decodes every vector from disk for each question (196
    ms at 25k passages); with it they stay in memory, in partitions of about 4,096 passages, and up
    to LanceDB's default of 20 probed its answers are the exact search's (15 ms; bench/library_scale.py)."""
    from lancedb.index import FTS, IvfFlat

    table.create_index("text", config=FTS(), replace=True)
    table.create_index(VECTORS, config=IvfFlat(distance_type="cosine"), replace=True)


def is_indexed(table) -> bool:
    """Whether ``table`` has both indexes :func:`index_table` makes. A version built before builds
    indexed the vectors has the text's only: its dense search reads every vector for each question,
    and the next build copies it into a version that has both."""
    return {index.columns[0] for index in table.list_indices()} >= {"text", VECTORS}


def publish_version(library: Path, manifest: Manifest) -> None:
    """Index the new version, write its manifest, then make it the one served (atomically and
    durably: a crash leaves either version whole); remove built versions older than the previous one."""
    version = manifest.version
    table = open_table(library, version)
    if table is not None:
        index_table(table)
    for path in (library / version).rglob("*"):  # the table's files hold patient text
        if path.is_file():
            path.chmod(0o600)
    write_private(library / version / MANIFEST_FILE, manifest.to_json())
    _fsync_directory(library / version)
    previous = current_version(library)
    pointer = library / f".{CURRENT_FILE}.{version}"
    try:
        write_private(pointer, version)
        os.replace(pointer, library / CURRENT_FILE)
        _fsync_directory(library)
    finally:
        pointer.unlink(missing_ok=True)
    for stale in _built_versions(library):
        if stale.name not in (version, previous):
            shutil.rmtree(stale, ignore_errors=True)
