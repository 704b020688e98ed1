"""Which embedder retrieves best: chosen on a library of SQuAD training articles none of them trained
on, reported on the open-domain dev library.

    python -m bench.embedder_choice --embedders sentence-transformers/all-MiniLM-L6-v2,runs/embedder/model \
        --exclude-articles-of runs/library-mined/train.json runs/library-mined/validation.json \
        --test-library runs/ask-dev-tuned/library

Validation: ``--validation-articles`` seeded training articles whose titles are in none of
``--exclude-articles-of`` (the files the embedders were mined from), written as paragraph documents
and built as a library (``OUTPUT_DIR/validation/library``, reused when there) as ``library_job evaluate``
builds one; test: a library ``library_job evaluate`` built over the dev set (its ``squad/`` and
``index/``). In both, questions are sampled as ``evaluate`` samples them (``--max-questions``, seed 0).

Each embedder embeds every passage of each library (its own and its sentences' vectors, as a build
does) and the questions; the dense ranking scores each passage by its best exact dot product (what
the index's flat multivector search returns), the lexical one is the library's own, and hybrid
fuses the two as served. A library built with one embedder thus measures any other without a
rebuild. The embedder with the best validation dense recall@5 (then hybrid recall@1) is the chosen
one; every embedder's test recall is reported beside it.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np

from bench import benchlib
from qa_common import read_squad
from qa_common.library.index import PASSAGE_COLUMNS
from qa_common.library.search import FUSION_DEPTH, Hit, Library, document_rank, recall_at, reciprocal_rank_fusion
from qa_common.splits import sample_questions

RECALL_AT = (1, 5, 20)
MODES = ("dense", "hybrid")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.embedder_choice", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embedders", required=True,
                        help="comma-separated embedders (a name or a model directory) to compare")
    parser.add_argument("--train-data", type=Path, default=benchlib.SQUAD_FULL_TRAIN,
                        help="SQuAD-format file the validation articles come from (default: the full training set)")
    parser.add_argument("--exclude-articles-of", type=Path, nargs="+", default=[],
                        help="SQuAD-format files whose articles are not validation articles (the embedders' own)")
    parser.add_argument("--validation-articles", type=int, default=48, help="default: %(default)s (as dev has)")
    parser.add_argument("--test-data", type=Path, default=benchlib.SQUAD_FULL_DEV)
    parser.add_argument("--test-library", type=Path, required=True,
                        help="a folder `library_job evaluate` wrote over --test-data (squad/ and index/)")
    parser.add_argument("--max-questions", type=int, default=2000, help="per set (default: %(default)s)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/embedder-choice"))
    parser.add_argument("--seed", type=int, default=0, help="of the validation articles (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=benchlib.RESULTS / "embedder_choice.json")
    return parser.parse_args(argv)


def validation_records(args: argparse.Namespace) -> list[dict]:
    excluded = {r.get("title", "") for path in args.exclude_articles_of for r in read_squad(path)}
    records = read_squad(args.train_data)
    titles = sorted({r.get("title", "") for r in records} - excluded)
    chosen = set(random.Random(args.seed).sample(titles, args.validation_articles))
    return [r for r in records if r.get("title", "") in chosen]


def validation_library(records: list[dict], folder: Path) -> Path:
    from library_job.squad_library import build_library, squad_documents

    if not (folder / "library" / "index").is_dir():
        build_library(squad_documents(records, "paragraph")[0], folder, None)
    return folder / "library"


class LibrarySet:
    """A library's passages and lexical rankings, and the sampled questions with their documents."""

    def __init__(self, folder: Path, records: list[dict], max_questions: int):
        from library_job.squad_library import folder_documents

        name_of = folder_documents(folder / "squad", {r["context"] for r in records})
        self.questions = sample_questions([r for r in records if r["context"] in name_of], max_questions, seed=0)
        self.documents = [name_of[r["context"]] for r in self.questions]
        library = Library(str(folder / "index"))
        rows = library.table.search().limit(None).select(list(PASSAGE_COLUMNS)).to_list()
        self.passages = [{key: row[key] for key in PASSAGE_COLUMNS} for row in rows]
        self.lexical = [library.rankings(r["question"], None, FUSION_DEPTH, dense=False)[1] for r in self.questions]

    def recalls(self, embedder) -> dict:
        questions = embedder.embed([r["question"] for r in self.questions])
        scores = np.stack([(questions @ vectors.T).max(axis=1)
                           for vectors in embedder.embed_passages([p["text"] for p in self.passages])], axis=1)
        ranks = {mode: [] for mode in MODES}
        for row, lexical, document in zip(scores, self.lexical, self.documents):
            dense = [Hit(self.passages[i], float(row[i])) for i in np.argsort(-row)[:FUSION_DEPTH]]
            ranks["dense"].append(document_rank(dense, document))
            ranks["hybrid"].append(document_rank(reciprocal_rank_fusion([dense, lexical]), document))
        return {f"{mode}_recall@{k}": recall_at(ranks[mode], k) for mode in MODES for k in RECALL_AT}


def main(argv=None) -> int:
    from qa_common.library.embedding import Embedder

    args = parse_args(argv)
    benchlib.quiet_libraries()
    load_before = benchlib.load_average()
    validation = validation_records(args)
    sets = {"validation": LibrarySet(validation_library(validation, args.output_dir / "validation"), validation,
                                     args.max_questions),
            "test": LibrarySet(args.test_library, read_squad(args.test_data), args.max_questions)}
    rows = []
    for name in args.embedders.split(","):
        embedder = Embedder(name)
        rows.append({"embedder": name, **{f"{set_name}_{key}": value for set_name, found in sets.items()
                                          for key, value in found.recalls(embedder).items()}})
        print(rows[-1], flush=True)
    chosen = max(rows, key=lambda row: (row["validation_dense_recall@5"], row["validation_hybrid_recall@1"]))
    ratios = {"chosen": chosen["embedder"], **{key: chosen[key] for key in chosen if key.startswith("test_")}}
    benchlib.print_table("Recall of the question's document per embedder", rows, list(rows[0]))
    settings = {"validation_questions": len(sets["validation"].questions), "test_questions": len(sets["test"].questions),
                "validation_titles": sorted({r.get("title", "") for r in validation}),
                **{key: str(value) for key, value in vars(args).items() if key != "out"}}
    benchlib.write_json(args.out, "embedder_choice", ratios, {"embedders": rows}, settings, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
