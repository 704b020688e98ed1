"""``python -m library_job mine``: training data for a reader that reads the library as ``/v1/ask``
does -- each question with the passages the library's own hybrid search returns for it.

A SQuAD-format training file's paragraphs become the documents of one library (built by
``python -m library_job build``, as ``evaluate`` builds its own), and each question is asked of it
(Ray Data actors, :class:`PassageFinder`). Its top ``--passages`` passages become one *group*: one
SQuAD 2.0 record per passage, sharing the question's ``group``, answered where the passage holds
one of the question's answers as whole words (each answer it holds, at its first occurrence: the
same words in a passage of another paragraph count, as the SQuAD metric would count them) and
unanswerable elsewhere.
``python -m train_job --shared-normalization`` normalises a group's windows together
(``train_job/loss.py``), so the reader learns which of the passages holds the answer, and that
none does when the search missed.

- ``--articles N``: a seeded N of the file's articles (a library of the size served; all by default).
- ``--absent-articles F``: a seeded share of those articles stays out of the library, so their
  questions are read over passages that cannot answer them (a question the library does not hold).
- ``--validation-questions N``: whole articles held out of the library and of training (seeded, at
  least N questions); their questions, each with its own paragraph, and half as many unanswerable
  ones (a question with another paragraph of its article) are OUTPUT/validation.json.
- ``--whole-library``: every article of the file is in the library (less the absent ones), not only
  the ``--articles`` asked about: questions read over the library that is served, for fitting a
  model's calibration over passages (``python -m qa_common.calibration --over-passages``) where
  ``evaluate`` reports it. The distractors a question meets, and so its scores, shift with the library.
  Its questions read as many passages as ``/v1/ask`` does unless ``--passages`` says otherwise: the
  threshold and the search order's weight fitted over five passages decline more and weigh less
  than eight need.

Writes OUTPUT/train.json (the groups), OUTPUT/validation.json, OUTPUT/mined.json (counts, recall)
and the library under OUTPUT/library.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

from qa_common import SquadFormatError, read_squad
from qa_common.library.index import LibraryError, write_private
from qa_common.negatives import synthesise_negatives
from qa_common.library.search import FUSION_DEPTH, PASSAGES_READ, reciprocal_rank_fusion
from qa_common.splits import absent_articles, hold_out_articles, sample_questions
from train_job.cli import at_least
from train_job.ray_cluster import ActorPool, add_actor_flags, add_address_flag, connect_ray
from library_job.squad_library import add_embedder_flag, build_library, paragraph_documents

# What the squad-minilm-library preset's reader is trained on; trained on eight, as /v1/ask reads, it scored no
# better end to end at a higher cost (ACCURACY.md, "The reader trained on eight passages").
TRAINING_PASSAGES = 5
VALIDATION_NEGATIVES = 0.5  # unanswerable validation questions per answerable one, as the squad-minilm preset's
SUMMARY = "multi-passage training data: each question with the passages the library's hybrid search returns"


def answers_in(passage: str, answers: list[str]) -> list[tuple[str, int]]:
    """Each of ``answers`` found in ``passage`` as whole words (not "19" inside "1990"), with the offset
    of its first occurrence, in the order of ``answers`` (each text once); [] when it holds none."""
    found = []
    for text in dict.fromkeys(answers):
        match = re.search(rf"(?<!\w){re.escape(text)}(?!\w)", passage)
        if match:
            found.append((text, match.start()))
    return found


def group_records(question: dict, passages: list[str]) -> list[dict]:
    """One SQuAD 2.0 record per read passage of ``question``, all in its group. A record keeps every
    answer of the question its passage holds: training learns the first (as it does any record's),
    and the calibration over passages counts a span right when it is any of them, as the SQuAD
    metric that ``evaluate`` reports does (SQuAD's dev questions have up to three answers)."""
    records = []
    for rank, passage in enumerate(passages):
        found = answers_in(passage, question["answers"]["text"])
        records.append({
            "id": f"{question['id']}/{rank}", "group": question["id"], "title": question.get("title", ""),
            "context": passage, "question": question["question"],
            "answers": {"text": [text for text, _ in found], "answer_start": [start for _, start in found]},
        })
    return records


class PassageFinder:
    """Ray Data actor: a batch of questions -> per question the texts and documents of its hybrid top passages."""

    def __init__(self, library: str, passages: int, threads: int):
        import torch

        from qa_common.library.embedding import Embedder
        from qa_common.library.search import Library

        torch.set_num_threads(threads)
        self.library = Library(library)
        self.embedder = Embedder(self.library.manifest.embedder, threads=threads)
        self.passages = passages

    def __call__(self, batch):
        import pyarrow as pa

        rows = batch.to_pylist()
        for row, vector in zip(rows, self.embedder.embed([row["question"] for row in rows])):
            hits = reciprocal_rank_fusion(self.library.rankings(row["question"], vector, FUSION_DEPTH))[: self.passages]
            row["passages"] = [hit.passage["text"] for hit in hits]
            row["documents"] = [hit.passage["document"] for hit in hits]
        return pa.Table.from_pylist(rows)


def choose_articles(records: list[dict], articles: int | None, seed: int) -> list[dict]:
    titles = sorted({record.get("title", "") for record in records})
    if articles is None or articles >= len(titles):
        return records
    chosen = set(random.Random(seed).sample(titles, articles))
    return [record for record in records if record.get("title", "") in chosen]


def split_articles(records: list[dict], args: argparse.Namespace) -> tuple[list[dict], list[dict], list[dict], set[str]]:
    """``(asked, validation, library, absent)``: the records whose questions are mined, the held-out
    validation records, the records whose paragraphs make the library, and the absent articles' titles
    (chosen among those asked; in no document of the library)."""
    if args.whole_library and args.validation_questions:
        raise ValueError("--whole-library puts every article in the library, --validation-questions holds some "
                         "out of it: use one of them")
    asked = choose_articles(records, args.articles, args.seed)
    validation = []
    if args.validation_questions:
        asked, validation = hold_out_articles(asked, args.validation_questions, seed=args.seed)
        # Unanswerable ones too, from the same articles: training chooses its no-answer threshold on them.
        validation += synthesise_negatives(validation, VALIDATION_NEGATIVES, seed=args.seed, source="article")
    absent = absent_articles(asked, args.absent_articles, args.seed)
    library = [record for record in (records if args.whole_library else asked) if record.get("title", "") not in absent]
    return asked, validation, library, absent


def passages_per_question(args: argparse.Namespace) -> int:
    """``--passages``, else as many as the mined questions are used with: a calibration's as served."""
    if args.passages is not None:
        return args.passages
    return PASSAGES_READ if args.whole_library else TRAINING_PASSAGES


def mine(args: argparse.Namespace) -> dict:
    import ray.data

    records, validation, in_library, absent = split_articles(read_squad(args.data), args)
    passages = passages_per_question(args)
    documents = paragraph_documents(in_library)
    name_of = {text: name for name, text in documents.items()}
    questions = sample_questions(records, args.max_questions, seed=args.seed)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    connect_ray(args.address)
    pool = ActorPool.fit(args, items=len(questions))
    started = time.perf_counter()
    library = build_library(documents, output, args.address, args.embedder)
    indexed_s = time.perf_counter() - started
    print(f"[mine] {len(documents)} paragraphs of {len({r.get('title', '') for r in in_library})} articles as the "
          f"library ({len(absent)} absent), {len(questions)} questions, {pool.actors} actor(s)", flush=True)
    rows = [{"id": r["id"], "question": r["question"]} for r in questions]
    found = ray.data.from_items(rows).map_batches(
        PassageFinder, fn_constructor_kwargs={"library": str(library.resolve()), "passages": passages,
                                              "threads": pool.threads},
        batch_size=args.batch_size, compute=ray.data.ActorPoolStrategy(size=pool.actors), batch_format="pyarrow",
        **pool.per_actor)
    by_id = {record["id"]: record for record in questions}
    groups, counts = [], {"answered": 0, "unanswered": 0, "gold_read": 0, "absent": 0}
    for row in found.iter_rows():
        question = by_id[row["id"]]
        group = group_records(question, list(row["passages"]))
        groups.append(group)
        answered = any(record["answers"]["text"] for record in group)
        counts["answered" if answered else "unanswered"] += 1
        counts["gold_read"] += name_of.get(question["context"]) in row["documents"]
        counts["absent"] += question.get("title", "") in absent
    # The pool answers in no fixed order; a group's records stay in the search's order, which the
    # calibration over passages weighs (qa_common.passage_decoding.with_rank_prior).
    train = [record for group in sorted(groups, key=lambda group: group[0]["group"]) for record in group]
    write_records(output / "train.json", train)
    if validation:
        write_records(output / "validation.json", validation)
    summary = {"questions": len(questions), "records": len(train), "passages_read": passages,
               "paragraphs": len(documents), "whole_library": args.whole_library, **counts,
               "gold_read_share": round(counts["gold_read"] / max(1, len(questions) - counts["absent"]), 4),
               "validation_questions": len(validation), "data": str(args.data), "index_s": round(indexed_s, 1),
               "mine_s": round(time.perf_counter() - started - indexed_s, 1)}
    (output / "mined.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2), flush=True)
    return summary


def write_records(path: Path, records: list[dict]) -> None:
    """Flat SQuAD-format records (read back by ``qa_common.read_squad``); 0600: a library's text may be patients'."""
    write_private(path, json.dumps({"data": records}, ensure_ascii=False) + "\n")


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="SQuAD-format training file (e.g. SQuAD's train-v1.1.json)")
    parser.add_argument("--output", required=True, help="output directory (train.json, validation.json, the library)")
    parser.add_argument("--passages", type=at_least(1), default=None,
                        help=f"passages per question (default: {TRAINING_PASSAGES}, what the squad-minilm-library "
                             f"preset was trained on; with --whole-library {PASSAGES_READ}, what /v1/ask reads, so "
                             "a calibration is fitted as it is served)")
    add_embedder_flag(parser)
    parser.add_argument("--articles", type=at_least(1), default=None, help="a seeded N of the file's articles (default: all)")
    parser.add_argument("--absent-articles", type=float, default=0.1,
                        help="share of the articles left out of the library: their questions are read over passages "
                             "that cannot answer them (default: 0.1)")
    parser.add_argument("--whole-library", action="store_true",
                        help="every article of --data in the library (less the absent ones), not only the --articles "
                             "asked about: calibration questions read over the library that is served")
    parser.add_argument("--validation-questions", type=at_least(1), default=None,
                        help="hold out whole articles with at least N questions as validation.json (default: none)")
    parser.add_argument("--max-questions", type=at_least(1), default=None, help="a seeded sample spread over the articles")
    parser.add_argument("--seed", type=int, default=0, help="the samples' seed (default: 0)")
    add_actor_flags(parser, "actors")
    parser.add_argument("--batch-size", type=at_least(1), default=64, help="questions per actor call (default: 64)")
    add_address_flag(parser)


def run(args: argparse.Namespace) -> None:
    mine(args)


USER_ERRORS = (SquadFormatError, OSError, ValueError, LibraryError)
