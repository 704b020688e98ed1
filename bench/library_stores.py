"""Two stores for the document library, measured on the same passages, vectors and questions.

    python -m bench.library_stores --library runs/ask-dev/library/index --data DEV.json --max-questions 2000

(the library: ``python -m library_job evaluate`` writes one of every paragraph of --data). The
passages and their all-MiniLM-L6-v2 vectors are read from that LanceDB index, the questions are
embedded once, and each store is built from them and asked the same questions:

- ``lancedb``: one embedded LanceDB table indexed as a library's is (qa_common.library.index.index_table):
  multivector search through an IVF_FLAT index (a passage's best cosine over its own vector and its
  sentences') and its native BM25 full-text index (stemmed, stop words removed);
- ``faiss+bm25s``: a faiss ``IndexFlatIP`` (exact) of every passage's and sentence's vector, a
  passage scored by its best, beside a bm25s index (PyStemmer's English stemmer, English stop
  words), the two persisted side by side.

For each: build time, size on disk, query latency (p50/p95 per question, one thread of the
caller), and recall@1/5/20 of the question's paragraph for lexical, dense and hybrid (reciprocal
rank fusion of each ranking's top 50, the same function for both stores).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import benchlib
from qa_common.library.index import PASSAGE_COLUMNS, TABLE, VECTORS, index_table, vectors_column
from qa_common.library.search import (
    FUSION_DEPTH, RRF_K, SEARCH_MODES, Hit, Library, document_rank, recall_at, reciprocal_rank_fusion,
)

RECALL_AT = (1, 5, 20)


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class LanceStore(Library):
    """The library's own store (its queries are :class:`Library`'s), over a table built here to time it."""

    name = "lancedb"

    def __init__(self, rows: list[dict], vectors: list[np.ndarray], directory: Path):
        import lancedb
        import pyarrow as pa

        started = time.perf_counter()
        columns = {name: [r[name] for r in rows] for name in PASSAGE_COLUMNS}
        columns[VECTORS] = vectors_column(vectors)
        self.table = lancedb.connect(str(directory)).create_table(TABLE, data=pa.table(columns))
        index_table(self.table)
        self.build_s = time.perf_counter() - started
        self.size = directory_size(directory)


class FaissBm25Store:
    """A :class:`qa_common.library.search.PassageStore` of faiss (exact inner product) and bm25s."""

    name = "faiss+bm25s"

    def __init__(self, rows: list[dict], vectors: list[np.ndarray], directory: Path):
        import bm25s
        import faiss
        import Stemmer

        started = time.perf_counter()
        self.rows = [{name: r[name] for name in PASSAGE_COLUMNS} for r in rows]
        self.owner = np.concatenate([np.full(len(v), i) for i, v in enumerate(vectors)])  # each vector's passage
        self.most_per_passage = max(len(v) for v in vectors)
        self.vectors = faiss.IndexFlatIP(vectors[0].shape[1])
        self.vectors.add(np.concatenate(vectors))
        self.stemmer = Stemmer.Stemmer("english")
        self.bm25 = bm25s.BM25()
        self.bm25.index(bm25s.tokenize([r["text"] for r in rows], stopwords="en", stemmer=self.stemmer,
                                       show_progress=False), show_progress=False)
        faiss.write_index(self.vectors, str(directory / "vectors.faiss"))
        self.bm25.save(str(directory / "bm25"))
        self.build_s = time.perf_counter() - started
        self.size = directory_size(directory)

    def rankings(self, query, vector, limit, *, dense=True, lexical=True, collection=None, document=None):
        if collection is not None or document is not None:
            raise ValueError("this store has no filters")
        return (self._dense(vector, limit) if dense else []), (self._lexical(query, limit) if lexical else [])

    def _dense(self, vector, k):
        """The ``k`` passages of the best vectors (enough vectors are searched to find ``k`` passages)."""
        scores, ids = self.vectors.search(vector[None], min(self.vectors.ntotal, k * self.most_per_passage))
        best: dict[int, float] = {}
        for i, score in zip(ids[0], scores[0]):
            if i >= 0:
                best.setdefault(int(self.owner[i]), float(score))  # in falling order: the first is its best
        return [Hit(self.rows[passage], score) for passage, score in list(best.items())[:k]]

    def _lexical(self, query, k):
        import bm25s

        tokens = bm25s.tokenize([query], stopwords="en", stemmer=self.stemmer, show_progress=False)
        if not tokens.ids[0]:
            return []
        ids, scores = self.bm25.retrieve(tokens, k=min(k, len(self.rows)), show_progress=False, n_threads=1)
        return [Hit(self.rows[i], float(s)) for i, s in zip(ids[0], scores[0]) if s > 0]


def evaluate(store, questions: list[dict], vectors: np.ndarray) -> dict:
    ranks = {mode: [] for mode in SEARCH_MODES}
    latency = {"lexical": [], "dense": []}
    for question, vector in zip(questions, vectors):
        started = time.perf_counter()
        dense, _ = store.rankings(question["question"], vector, FUSION_DEPTH, lexical=False)
        latency["dense"].append(time.perf_counter() - started)
        started = time.perf_counter()
        _, lexical = store.rankings(question["question"], vector, FUSION_DEPTH, dense=False)
        latency["lexical"].append(time.perf_counter() - started)
        for mode, hits in (("lexical", lexical), ("dense", dense), ("hybrid", reciprocal_rank_fusion([dense, lexical]))):
            ranks[mode].append(document_rank(hits, question["document"]))
    result = {"build_s": round(store.build_s, 2), "size_mb": round(store.size / 2**20, 2)}
    for mode, values in latency.items():
        result[f"{mode}_query_ms_p50"] = round(1000 * benchlib.percentile(values, 50), 2)
        result[f"{mode}_query_ms_p95"] = round(1000 * benchlib.percentile(values, 95), 2)
    for mode, values in ranks.items():
        for k in RECALL_AT:
            result[f"{mode}_recall@{k}"] = recall_at(values, k)
    return result


def main(argv=None) -> None:
    from qa_common import read_squad
    from qa_common.library.embedding import Embedder
    from qa_common.splits import sample_questions
    from library_job.squad_library import paragraph_documents

    parser = argparse.ArgumentParser(prog="python -m bench.library_stores", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", type=Path, required=True, help="a library written by python -m library_job evaluate")
    parser.add_argument("--data", type=Path, default=benchlib.SQUAD_FULL_DEV, help="the SQuAD file it indexes")
    parser.add_argument("--max-questions", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=benchlib.RESULTS / "library_stores.json")
    args = parser.parse_args(argv)
    load_before = benchlib.load_average()

    records = read_squad(args.data)
    name_of = {text: name for name, text in paragraph_documents(records).items()}
    questions = [{"question": r["question"], "document": name_of[r["context"]]}
                 for r in sample_questions(records, args.max_questions, seed=args.seed)]
    library = Library(args.library)
    rows = library.table.search().limit(None).select([*PASSAGE_COLUMNS, VECTORS]).to_list()
    vectors = [np.asarray(row[VECTORS], dtype=np.float32) for row in rows]
    embedder = Embedder(library.manifest.embedder)
    started = time.perf_counter()
    question_vectors = embedder.embed([q["question"] for q in questions])
    embed_ms = 1000 * (time.perf_counter() - started) / len(questions)
    results = {}
    for store_class in (LanceStore, FaissBm25Store):
        directory = Path(tempfile.mkdtemp(prefix="store-"))
        try:
            results[store_class.name] = evaluate(store_class(rows, vectors, directory), questions, question_vectors)
        finally:
            shutil.rmtree(directory)
        print(store_class.name, results[store_class.name], flush=True)
    benchlib.write_json(
        args.out, "library_stores",
        {"hybrid_recall@5_lancedb_minus_faiss_bm25s": round(results["lancedb"]["hybrid_recall@5"]
                                                            - results["faiss+bm25s"]["hybrid_recall@5"], 4)},
        {**results, "question_embedding_ms": round(embed_ms, 2)},
        {"passages": len(rows), "questions": len(questions), "depth": FUSION_DEPTH, "rrf_k": RRF_K,
         "data": benchlib.data_label(args.data)}, load_before)


if __name__ == "__main__":
    main()
