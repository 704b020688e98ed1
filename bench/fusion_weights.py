"""Weighted reciprocal rank fusion against the equal weights hybrid search uses, chosen on one set of
questions and reported on another.

    python -m bench.fusion_weights --data DEV.json --validation-articles-of runs/calibration-mined/train.json \
        --validation-library runs/calibration-mined/library --test-library runs/ask-dev-calibrated/library

Each library is a folder as ``python -m library_job mine`` or ``evaluate`` writes it (``squad/``: the
documents, ``index/``: the library built from them); a question's document is the one holding its
paragraph (``library_job.squad_library.folder_documents``), and questions whose paragraph is in no
document are left out. The dense and lexical rankings of each question (top 50 each, as hybrid
search fuses them) are read once; each dense weight ``w`` fuses them as
``w / (60 + dense rank) + (1 - w) / (60 + lexical rank)`` (``w = 0.5`` is the served RRF). The
weight with the best validation recall@1 (then recall@5) is the chosen one; its test recall is
reported beside the equal weights'. Validation: the questions of ``--validation-articles-of``'s
articles; test: those of the other articles.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import benchlib
from qa_common import read_squad
from qa_common.library.search import FUSION_DEPTH, Library, document_rank, recall_at, reciprocal_rank_fusion
from qa_common.splits import sample_questions

WEIGHTS = tuple(round(0.1 * step, 1) for step in range(1, 10))
RECALL_AT = (1, 5, 20)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fusion_weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="SQuAD-format questions of both sets")
    parser.add_argument("--validation-articles-of", type=Path, required=True,
                        help="a SQuAD-format file: questions of its articles choose the weight, the rest test it")
    parser.add_argument("--validation-library", type=Path, required=True, help="the library the validation asks")
    parser.add_argument("--test-library", type=Path, required=True, help="the library the test asks")
    parser.add_argument("--max-questions", type=int, default=2000, help="per set, a seeded sample (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=benchlib.RESULTS / "fusion_weights.json")
    return parser.parse_args(argv)


def fused_rank(dense: list, lexical: list, weight: float, document: str) -> int:
    return document_rank(reciprocal_rank_fusion([dense, lexical], weights=(weight, 1 - weight)), document)


def rankings(folder: Path, records: list[dict], max_questions: int) -> list[tuple[list, list, str]]:
    """``(dense, lexical, gold document)`` per sampled question whose paragraph the library holds."""
    from library_job.squad_library import folder_documents
    from qa_common.library.embedding import Embedder

    name_of = folder_documents(folder / "squad", {r["context"] for r in records})
    questions = sample_questions([r for r in records if r["context"] in name_of], max_questions, seed=0)
    library = Library(str(folder / "index"))
    embedder = Embedder(library.manifest.embedder)
    vectors = embedder.embed([r["question"] for r in questions])
    return [(*library.rankings(r["question"], vector, FUSION_DEPTH), name_of[r["context"]])
            for r, vector in zip(questions, vectors)]


def recalls(ranked: list[tuple[list, list, str]], weight: float) -> dict:
    ranks = [fused_rank(dense, lexical, weight, document) for dense, lexical, document in ranked]
    return {f"recall@{k}": recall_at(ranks, k) for k in RECALL_AT}


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = benchlib.load_average()
    records = read_squad(args.data)
    chosen_on = {r.get("title", "") for r in read_squad(args.validation_articles_of)}
    validation = [r for r in records if r.get("title", "") in chosen_on]
    test = [r for r in records if r.get("title", "") not in chosen_on]
    sets = {"validation": rankings(args.validation_library, validation, args.max_questions),
            "test": rankings(args.test_library, test, args.max_questions)}
    rows = [{"weight": w, **{f"{name}_{key}": value for name, ranked in sets.items()
                             for key, value in recalls(ranked, w).items()}} for w in WEIGHTS]
    chosen = max(rows, key=lambda row: (row["validation_recall@1"], row["validation_recall@5"], -abs(row["weight"] - 0.5)))
    equal = next(row for row in rows if row["weight"] == 0.5)
    ratios = {"chosen_dense_weight": chosen["weight"],
              "test_recall@1_chosen_vs_equal": round(chosen["test_recall@1"] - equal["test_recall@1"], 4),
              "test_recall@5_chosen_vs_equal": round(chosen["test_recall@5"] - equal["test_recall@5"], 4)}
    benchlib.print_table("Ratios", [{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    benchlib.print_table("Recall of the question's document per dense weight", rows, list(rows[0]))
    settings = {"validation_questions": len(sets["validation"]), "test_questions": len(sets["test"]),
                **{key: str(value) for key, value in vars(args).items() if key != "out"}}
    benchlib.write_json(args.out, "fusion_weights", ratios, {"weights": rows}, settings, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
