"""A library's dense search as the library grows: exact, and through the vector index a build makes.

    python -m bench.library_scale --distractors 20000

The library is SQuAD dev's paragraphs plus the first ``--distractors`` distinct paragraphs of SQuAD
train (documents no question is about), cut into passages and embedded as ``library_job build`` does
(passage and sentence vectors, ``qa_common.library``). For each size in ``--sizes`` (the first N
passages, dev's first) a LanceDB table of them is asked ``--questions`` dev questions by
:meth:`qa_common.library.search.Library.rankings` (dense, the top 50 that hybrid search fuses) with no
vector index, then again after :func:`qa_common.library.index.index_table`; reported: each query's
latency (p50/p95, one thread of the caller, warm), whether the indexed search returned the exact
search's passages in the same order, recall@1/5 of the question's paragraph, the index's build time
and the table's size on disk before and after.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import benchlib
from bench.library_stores import directory_size
from qa_common.library.index import PASSAGE_COLUMNS, TABLE, VECTORS, index_table, vectors_column
from qa_common.library.search import FUSION_DEPTH, Hit, Library, document_rank, recall_at


def library_passages(paragraphs: list[str]) -> list[dict]:
    """The passages of each paragraph as a one-block document ``NNNNNN.txt`` (PASSAGE_COLUMNS)."""
    from qa_common.library.documents import Block
    from qa_common.library.passages import split_passages

    rows = []
    for number, paragraph in enumerate(paragraphs):
        for passage in split_passages([Block(paragraph, None, "")]):
            rows.append({"passage_id": f"p{len(rows):07d}", "collection": "squad", "document": f"{number:06d}.txt",
                         "page": passage.page, "section": passage.section, "text": passage.text})
    return rows


class TableStore(Library):
    """:class:`Library`'s queries over a table written here (no manifest, no versions)."""

    def __init__(self, rows: list[dict], vectors: list[np.ndarray], directory: Path):
        import lancedb
        import pyarrow as pa

        columns = {name: [row[name] for row in rows] for name in PASSAGE_COLUMNS}
        columns[VECTORS] = vectors_column(vectors)
        self.table = lancedb.connect(str(directory)).create_table(TABLE, data=pa.table(columns))


def ask(store: TableStore, question_vectors: np.ndarray) -> tuple[list[list[Hit]], list[float]]:
    """Each question's dense top :data:`FUSION_DEPTH` passages, and each query's seconds (after one warm-up)."""
    store.rankings("", question_vectors[0], FUSION_DEPTH, lexical=False)
    rankings, seconds = [], []
    for vector in question_vectors:
        started = time.perf_counter()
        dense, _ = store.rankings("", vector, FUSION_DEPTH, lexical=False)
        seconds.append(time.perf_counter() - started)
        rankings.append(dense)
    return rankings, seconds


def measure(rows, vectors, questions, question_vectors, size: int) -> dict:
    directory = Path(tempfile.mkdtemp(prefix="library-scale-"))
    try:
        store = TableStore(rows[:size], vectors[:size], directory)
        size_before = directory_size(directory)
        exact, exact_s = ask(store, question_vectors)
        started = time.perf_counter()
        index_table(store.table)
        index_s = time.perf_counter() - started
        indexed, indexed_s = ask(store, question_vectors)
        result = {"passages": size, "vectors": int(sum(len(v) for v in vectors[:size])),
                  "index_build_s": round(index_s, 2), "size_mb_before": round(size_before / 2**20, 1),
                  "size_mb_indexed": round(directory_size(directory) / 2**20, 1),
                  "same_ranking": round(float(np.mean([[hit.passage["passage_id"] for hit in a]
                                                       == [hit.passage["passage_id"] for hit in b]
                                                       for a, b in zip(exact, indexed)])), 4)}
        for label, ranking, seconds in (("exact", exact, exact_s), ("indexed", indexed, indexed_s)):
            ranks = [document_rank(hits, question["document"]) for hits, question in zip(ranking, questions)]
            result[f"{label}_query_ms_p50"] = round(1000 * benchlib.percentile(seconds, 50), 2)
            result[f"{label}_query_ms_p95"] = round(1000 * benchlib.percentile(seconds, 95), 2)
            result[f"{label}_recall@1"], result[f"{label}_recall@5"] = recall_at(ranks, 1), recall_at(ranks, 5)
        return result
    finally:
        shutil.rmtree(directory)


def main(argv=None) -> int:
    from tqdm import tqdm

    from qa_common import read_squad
    from qa_common.library.embedding import EMBEDDER, Embedder
    from qa_common.splits import sample_questions

    parser = argparse.ArgumentParser(prog="python -m bench.library_scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dev", type=Path, default=benchlib.SQUAD_FULL_DEV, help="questions and their paragraphs")
    parser.add_argument("--train", type=Path, default=benchlib.SQUAD_FULL_TRAIN, help="where distractors come from")
    parser.add_argument("--distractors", type=int, default=20_000,
                        help="training paragraphs added (default: %(default)s, more than SQuAD train's 18,891)")
    parser.add_argument("--sizes", default="2500,10000", help="library sizes in passages measured besides the whole")
    parser.add_argument("--questions", type=int, default=300, help="dev questions asked (default: %(default)s)")
    parser.add_argument("--embedder", default=EMBEDDER, help="sentence embedder (default: the packaged one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=benchlib.RESULTS / "library_scale.json")
    args = parser.parse_args(argv)
    load_before = benchlib.load_average()

    dev = read_squad(args.dev)
    dev_paragraphs = list(dict.fromkeys(r["context"] for r in dev))
    distractors = list(dict.fromkeys(r["context"] for r in read_squad(args.train)))[:args.distractors]
    rows = library_passages(dev_paragraphs + distractors)
    number = {text: i for i, text in enumerate(dev_paragraphs)}
    questions = [{"question": r["question"], "document": f"{number[r['context']]:06d}.txt"}
                 for r in sample_questions(dev, args.questions, seed=args.seed)]
    embedder = Embedder(args.embedder)
    started = time.perf_counter()
    vectors = []
    for start in tqdm(range(0, len(rows), 256), desc="embedding passages", unit="batch"):
        vectors += embedder.embed_passages([row["text"] for row in rows[start:start + 256]])
    embed_s = time.perf_counter() - started
    question_vectors = embedder.embed([q["question"] for q in questions])

    sizes = sorted({*(int(s) for s in args.sizes.split(",") if int(s) < len(rows)), len(rows)})
    results = []
    for size in sizes:
        results.append(measure(rows, vectors, questions, question_vectors, size))
        print(results[-1], flush=True)
    benchlib.print_table("dense search, exact vs through the index", results, list(results[0]))
    largest = results[-1]
    ratios = {"query_p50_exact_over_indexed_largest": benchlib.ratio(largest["exact_query_ms_p50"],
                                                                     largest["indexed_query_ms_p50"]),
              "same_ranking_largest": largest["same_ranking"]}
    benchlib.print_table("Ratios", [{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    benchlib.write_json(
        args.out, "library_scale", ratios,
        {"sizes": results, "embedding_passages_per_s": round(len(rows) / embed_s, 1)},
        {"dev_paragraphs": len(dev_paragraphs), "distractor_paragraphs": len(distractors), "passages": len(rows),
         "questions": len(questions), "depth": FUSION_DEPTH, "embedder": args.embedder,
         "dev": benchlib.data_label(args.dev), "train": benchlib.data_label(args.train)}, load_before)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
