"""A document library's index on disk, and hybrid search over it (LanceDB: vectors and full text).

Layout of an index directory (``INDEX``)::

    INDEX/CURRENT                the name of the version being served (replaced atomically)
    INDEX/<version>/passages.lance   one LanceDB table: a row per passage (PASSAGE_COLUMNS + vector)
    INDEX/<version>/manifest.json    collections, documents (path, content hash, passages), embedder

A build writes a new version beside the served one and switches ``CURRENT`` only once it is
complete, so a reader never sees half an index; the previous version is kept for readers that
still have it open, older ones are removed. Paths and file names stay on the server: nothing
here returns them except to the index's own builder and to an answer's citation (``document``).

Search is hybrid: the dense ranking (dot product of unit vectors, exact) and the full-text one
(BM25 over stemmed words, so drug names, doses and abbreviations match by their letters) are
fused by reciprocal rank fusion, ``sum 1 / (RRF_K + rank)`` (Cormack et al. 2009; k = 60).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CURRENT_FILE = "CURRENT"
MANIFEST_FILE = "manifest.json"
TABLE = "passages"
PASSAGE_COLUMNS = ("passage_id", "collection", "document", "page", "section", "text")
RRF_K = 60
FUSION_DEPTH = 50  # how much of each ranking hybrid search fuses
SEARCH_MODES = ("hybrid", "dense", "lexical")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a collection's name


class LibraryError(ValueError):
    """The index is missing or unusable; the message says what to run."""


def check_collection_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"collection name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting "
                         "with a letter or digit")
    return name


def current_version(index: Path) -> str | None:
    try:
        return (index / CURRENT_FILE).read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def read_manifest(index: Path, version: str | None = None) -> dict:
    """The manifest of ``version`` (default: the one being served)."""
    version = version or current_version(index)
    if version is None:
        raise LibraryError(f"no library index at {index}: build one with "
                           "`python -m train_job.index build DOCS_DIR --index INDEX`")
    return json.loads((index / version / MANIFEST_FILE).read_text(encoding="utf-8"))


def publish_version(index: Path, version: str, manifest: dict) -> None:
    """Index the new version's text, write its manifest, then make it the one served (atomically)."""
    import lancedb
    from lancedb.index import FTS

    database = lancedb.connect(str(index / version))
    if TABLE in database.table_names():
        database.open_table(TABLE).create_index("text", config=FTS(), replace=True)  # "text": the column
    (index / version / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    previous = current_version(index)
    pointer = index / f".{CURRENT_FILE}.{version}"
    pointer.write_text(version, encoding="utf-8")
    os.replace(pointer, index / CURRENT_FILE)
    for stale in index.iterdir():
        if stale.is_dir() and stale.name not in (version, previous) and (stale / MANIFEST_FILE).exists():
            shutil.rmtree(stale, ignore_errors=True)


def collections_summary(manifest: dict) -> list[dict]:
    """What ``GET /v1/collections`` shows: names and counts, never a path."""
    return [{"name": name, "documents": counts["documents"], "passages": counts["passages"]}
            for name, counts in sorted(manifest["collections"].items())]


def _quoted(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class Hit:
    passage: dict  # PASSAGE_COLUMNS
    score: float  # the fused score (hybrid) or the ranking's own (dense: cosine; lexical: BM25)


class Library:
    """The served version of an index; :meth:`refresh` moves to a newer one when a build has published it."""

    def __init__(self, index: str | Path):
        self.index = Path(index)
        self.version, self.manifest, self.table = None, None, None
        self.refresh()

    def refresh(self) -> bool:
        """Open the version ``CURRENT`` names if it is not the open one; True when it changed."""
        import lancedb

        version = current_version(self.index)
        if version == self.version:
            return False
        manifest = read_manifest(self.index, version)
        database = lancedb.connect(str(self.index / version))
        self.table = database.open_table(TABLE) if TABLE in database.table_names() else None
        self.version, self.manifest = version, manifest
        return True

    def search(self, query: str, vector: np.ndarray | None, k: int, *, mode: str = "hybrid",
               collection: str | None = None, document: str | None = None, depth: int = FUSION_DEPTH) -> list[Hit]:
        """The ``k`` best passages for ``query`` (its embedding ``vector`` for dense and hybrid search),
        optionally only of one ``collection`` and/or one ``document``. Hybrid fuses each ranking's top
        ``max(depth, k)``."""
        if mode not in SEARCH_MODES:
            raise ValueError(f"search mode {mode!r}: choose one of {', '.join(SEARCH_MODES)}")
        dense, lexical = self.rankings(query, vector, max(depth, k) if mode == "hybrid" else k,
                                       dense=mode != "lexical", lexical=mode != "dense",
                                       collection=collection, document=document)
        if mode == "hybrid":
            return reciprocal_rank_fusion([dense, lexical])[:k]
        return dense if mode == "dense" else lexical

    def rankings(self, query: str, vector: np.ndarray | None, limit: int, *, dense: bool = True,
                 lexical: bool = True, collection: str | None = None, document: str | None = None
                 ) -> tuple[list[Hit], list[Hit]]:
        """``(dense ranking, lexical ranking)``, each of at most ``limit`` passages ([] when not asked for,
        or for an empty library); :func:`reciprocal_rank_fusion` of the two is the hybrid ranking."""
        if self.table is None or limit < 1:
            return [], []
        where = " AND ".join(f"{column} = {_quoted(value)}" for column, value in
                             (("collection", collection), ("document", document)) if value is not None) or None
        dense_hits = self._ranked(self.table.search(np.asarray(vector, dtype=np.float32)).distance_type("dot"),
                                  where, limit, "_distance") if dense else []
        lexical_hits = self._ranked(self.table.search(query, query_type="fts"), where, limit, "_score") \
            if lexical and query.strip() else []
        return dense_hits, lexical_hits

    @staticmethod
    def _ranked(search, where: str | None, limit: int, score_column: str) -> list[Hit]:
        if where:
            search = search.where(where, prefilter=True)
        rows = search.select([*PASSAGE_COLUMNS, score_column]).limit(limit).to_list()
        to_score = (lambda value: 1.0 - value) if score_column == "_distance" else float  # dot distance is 1 - cos
        return [Hit({column: row[column] for column in PASSAGE_COLUMNS}, to_score(row[score_column])) for row in rows]


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Hit]], k: int = RRF_K) -> list[Hit]:
    """One ranking from several: each passage scores ``sum 1 / (k + rank)`` over the rankings it is in."""
    fused, passages = {}, {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            key = hit.passage["passage_id"]
            fused[key] = fused.get(key, 0.0) + 1.0 / (k + rank)
            passages[key] = hit.passage
    order = sorted(fused, key=lambda key: -fused[key])
    return [Hit(passages[key], fused[key]) for key in order]
