"""Search over a library: a dense ranking, a lexical one, and their fusion.

A store is anything with :meth:`PassageStore.rankings` (:class:`Library` is the LanceDB index on
disk; ``bench.library_stores`` plugs in faiss + bm25s). Hybrid search fuses the dense ranking (a
passage scores the best cosine similarity of the question's vector with the passage's own vector
and its sentences', ``qa_common.library.embedding``) and the lexical one (BM25 over stemmed words,
so drug names, doses and abbreviations match by their letters) by reciprocal rank fusion,
``sum 1 / (RRF_K + rank)`` (Cormack et al. 2009; k = 60).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from qa_common.library.index import PASSAGE_COLUMNS, VECTORS, Manifest, current_version, open_table, read_manifest

RRF_K = 60
# Passages a question is read over unless it says: /v1/ask's default (ServeArgs.passages) and library_job
# evaluate's. Eight find more answers than five (open-domain SQuAD dev F1 67.58 against 66.95, ACCURACY.md)
# within the /v1/ask latency target, at a cost in questions/s under load (BENCHMARKS.md, "Eight passages
# by default").
PASSAGES_READ = 8
FUSION_DEPTH = 50  # how much of each ranking hybrid search fuses
SEARCH_MODES = ("hybrid", "dense", "lexical")


@dataclass(frozen=True)
class Hit:
    passage: dict  # PASSAGE_COLUMNS
    score: float  # the fused score (hybrid) or the ranking's own (dense: the best cosine; lexical: BM25)


class PassageStore(Protocol):
    def rankings(self, query: str, vector: np.ndarray | None, limit: int, *, dense: bool = True,
                 lexical: bool = True, collection: str | None = None, document: str | None = None
                 ) -> tuple[list[Hit], list[Hit]]:
        """``(dense ranking, lexical ranking)``, each of at most ``limit`` passages ([] when not asked
        for, or for an empty store), optionally only of one ``collection`` and/or one ``document``."""


def search(store: PassageStore, query: str, vector: np.ndarray | None, k: int, *, mode: str = "hybrid",
           collection: str | None = None, document: str | None = None, depth: int = FUSION_DEPTH) -> list[Hit]:
    """The ``k`` best passages of ``store`` for ``query`` (its embedding ``vector`` for dense and
    hybrid search). Hybrid fuses each ranking's top ``max(depth, k)``."""
    if mode not in SEARCH_MODES:
        raise ValueError(f"search mode {mode!r}: choose one of {', '.join(SEARCH_MODES)}")
    dense, lexical = store.rankings(query, vector, max(depth, k) if mode == "hybrid" else k,
                                    dense=mode != "lexical", lexical=mode != "dense",
                                    collection=collection, document=document)
    if mode == "hybrid":
        return reciprocal_rank_fusion([dense, lexical])[:k]
    return dense if mode == "dense" else lexical


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Hit]], k: int = RRF_K,
                           weights: Sequence[float] | None = None) -> list[Hit]:
    """One ranking from several: each passage scores ``sum w / (k + rank)`` over the rankings it is in
    (``w`` the ranking's weight, 1 unless ``weights`` are given)."""
    fused, passages = {}, {}
    for ranking, weight in zip(rankings, weights or [1.0] * len(rankings)):
        for rank, hit in enumerate(ranking, start=1):
            key = hit.passage["passage_id"]
            fused[key] = fused.get(key, 0.0) + weight / (k + rank)
            passages[key] = hit.passage
    order = sorted(fused, key=lambda key: -fused[key])
    return [Hit(passages[key], fused[key]) for key in order]


def document_rank(hits: Sequence[Hit], document: str) -> int:
    """The 1-based rank of ``document`` among the distinct documents of ``hits``; 0 when absent."""
    documents = list(dict.fromkeys(hit.passage["document"] for hit in hits))
    return documents.index(document) + 1 if document in documents else 0


def recall_at(ranks: Sequence[int], k: int) -> float:
    """The share of questions whose gold item is at rank ``1..k`` (rank 0: not retrieved)."""
    return round(sum(0 < rank <= k for rank in ranks) / len(ranks), 4) if ranks else 0.0


def _quoted(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class Library:
    """The served version of an index on disk (a :class:`PassageStore`); :meth:`refresh` moves to a
    newer one when a build has published it."""

    def __init__(self, library: str | Path):
        self.path = Path(library)
        self.version: str | None = None
        self.manifest: Manifest | None = None
        self.table = None
        self.refresh()

    def refresh(self) -> bool:
        """Open the version ``CURRENT`` names if it is not the open one; True when it changed."""
        version = current_version(self.path)
        if version == self.version:
            return False
        manifest = read_manifest(self.path, version)
        self.table = open_table(self.path, manifest.version)
        self.version, self.manifest = manifest.version, manifest
        return True

    def search(self, query: str, vector: np.ndarray | None, k: int, **options) -> list[Hit]:
        """:func:`search` over this library."""
        return search(self, query, vector, k, **options)

    def rankings(self, query: str, vector: np.ndarray | None, limit: int, *, dense: bool = True,
                 lexical: bool = True, collection: str | None = None, document: str | None = None
                 ) -> tuple[list[Hit], list[Hit]]:
        if self.table is None or limit < 1:
            return [], []
        where = " AND ".join(f"{column} = {_quoted(value)}" for column, value in
                             (("collection", collection), ("document", document)) if value is not None) or None
        # A multivector column: LanceDB's distance is 1 - the best cosine of the passage's vectors (index.index_table).
        dense_hits = self._ranked(self.table.search(np.asarray(vector, dtype=np.float32), vector_column_name=VECTORS)
                                  .distance_type("cosine"), where, limit, "_distance") if dense else []
        lexical_hits = self._ranked(self.table.search(query, query_type="fts"), where, limit, "_score") \
            if lexical and query.strip() else []
        return dense_hits, lexical_hits

    def passages(self, ids: Sequence[str]) -> list[dict]:
        """The passages (PASSAGE_COLUMNS) with these ids that this version holds, in no order."""
        if self.table is None or not ids:
            return []
        rows = (self.table.search().where(f"passage_id IN ({', '.join(_quoted(i) for i in ids)})")
                .select(list(PASSAGE_COLUMNS)).limit(len(ids)).to_list())
        return [{column: row[column] for column in PASSAGE_COLUMNS} for row in rows]

    @staticmethod
    def _ranked(query, where: str | None, limit: int, score_column: str) -> list[Hit]:
        if where:
            query = query.where(where, prefilter=True)
        rows = query.select([*PASSAGE_COLUMNS, score_column]).limit(limit).to_list()
        to_score = (lambda value: 1.0 - value) if score_column == "_distance" else float
        return [Hit({column: row[column] for column in PASSAGE_COLUMNS}, to_score(row[score_column])) for row in rows]
