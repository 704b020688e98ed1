"""``python -m library_job evaluate``: open-domain evaluation. Every paragraph of a SQuAD-format file
becomes a document of one library, and every question is asked of the whole library.

Pipeline: the paragraphs are written as text files and indexed with ``python -m library_job build``
(the same passages, embeddings and store a user gets), unless ``--library`` names a library built
that way already; Ray Data ``map_batches`` on a pool of actors (:class:`LibraryAsker`: the
library, its embedder and the reader) retrieves for each question with each search mode, reads the
hybrid top ``--passages`` as one candidate set (what ``POST /v1/ask`` does) and, for comparison,
the gold paragraph alone. Reports retrieval recall@1/5/20 per mode (a question's paragraph is
retrieved when one of its passages is), recall@1/5 of the passages read as the reader ranks them
(``reader_recall@k``, k up to ``--passages``: :func:`qa_common.passage_decoding.passage_order`),
end-to-end EM/F1 and the same reader's EM/F1 with the gold paragraph, and the served response end
to end (its top answer, "not in the library" included): its score's expected calibration error
against exact match, the share of questions answered at >= 80 % and >= 90 % precision (highest
scores first, the rest declined) and a reliability diagram (``OUTPUT/metrics.json``,
``OUTPUT/reliability.png``; ``OUTPUT/answers.jsonl``: per question the ranks and answers).

``--absent-articles F`` leaves a seeded share of the articles out of the library: their questions
are still asked, declining is their right answer, and the no-answer probability's ROC AUC for
telling them apart is reported. A model calibrated over a library's retrievals (``python -m
qa_common.calibration --over-passages``) is reported as served and, beside it, with its
one-paragraph calibration (``one_paragraph_*``); ``--skip-articles-of`` keeps the questions that
calibration was fitted on out of the evaluation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qa_common import PassagesQuestion, Question, SquadFormatError, decode_passages, decode_spans, load_qa_config, read_squad
from qa_common.calibration import answered_at_precision, expected_calibration_error, reliability
from qa_common.library.search import FUSION_DEPTH, PASSAGES_READ, SEARCH_MODES, document_rank, recall_at, reciprocal_rank_fusion
from qa_common.inference import question_logits
from qa_common.passage_decoding import passage_order
from qa_common.metric import question_scores
from qa_common.modeling import check_model_dir
from qa_common.splits import absent_articles, sample_questions
from library_job.squad_library import (DOCUMENT_SHAPES, add_embedder_flag, build_library, folder_documents,
                                    index_folder, squad_documents)
from train_job.cli import at_least
from train_job.ray_cluster import ActorPool, add_actor_flags, add_address_flag, connect_ray

SUMMARY = "ask every question of a SQuAD file of a library of its paragraphs: recall, EM/F1"
RECALL_AT = (1, 5, 20)
SELECTIVE_PRECISIONS = (0.8, 0.9)


class LibraryAsker:
    """Ray Data actor: a batch of questions -> per question its retrieval ranks and both answers."""

    def __init__(self, library: str, model_dir: str, passages: int, threads: int):
        import torch

        from qa_common.backends import load_runner
        from qa_common.library.embedding import Embedder
        from qa_common.library.search import Library

        torch.set_num_threads(threads)
        self.library = Library(library)
        self.embedder = Embedder(self.library.manifest.embedder, threads=threads)
        self.runner, self.tokenizer, _ = load_runner(model_dir, "torch", device="cpu", dtype=torch.float32,
                                                     threads=threads)
        self.config = load_qa_config(model_dir)
        # As served; and, for a model calibrated over a library, as it would be without that calibration.
        self.settings = {"": self.config}
        if self.config.passages_calibration:
            self.settings["one_paragraph_"] = self.config.replace(passages_calibration={})
        self.passages = passages

    def __call__(self, batch):
        import pyarrow as pa

        rows = batch.to_pylist()
        vectors = self.embedder.embed([row["question"] for row in rows])
        read, gold, read_hits = [], [], []
        for row, vector in zip(rows, vectors):
            # Each ranking once, fused as Library.search("hybrid") fuses them.
            dense, lexical = self.library.rankings(row["question"], vector, FUSION_DEPTH)
            ranked = {"dense": dense, "lexical": lexical, "hybrid": reciprocal_rank_fusion([dense, lexical])}
            for mode, hits in ranked.items():
                row[f"{mode}_rank"] = document_rank(hits[: max(RECALL_AT)], row["document"])
            hybrid = ranked["hybrid"][: self.passages]
            read_hits.append(hybrid)
            row["read"] = [hit.passage["document"] for hit in hybrid]
            read.append(PassagesQuestion(row["question"], tuple(hit.passage["text"] for hit in hybrid)))
            gold.append(Question(row["question"], row["context"]))
        logits = list(question_logits(self.runner, self.tokenizer, [*read, *gold], self.config))
        for row, question, hits, passage_logits, gold_logits in zip(rows, read, read_hits, logits[: len(rows)],
                                                                    logits[len(rows):]):
            order = passage_order(*passage_logits, len(question.passages))
            row["reader_rank"] = document_rank([hits[p] for p in order], row["document"])
            golds = [] if row["absent"] else row["answers"]["text"]  # absent: "not in the library" is right
            for prefix, config in self.settings.items():
                best = decode_passages(*passage_logits, question.passages, config)[0]
                row.update({f"{prefix}answer": best["answer"], f"{prefix}score": best["score"],
                            f"{prefix}no_answer_probability": best["no_answer_probability"]})
                row.update({f"{prefix}{name}": value for name, value in scored(best["answer"], golds).items()})
                if not prefix:
                    row["answer_document"] = row["read"][best["passage"]] if best["passage"] >= 0 else None
            alone = decode_spans(*gold_logits[:3], row["context"], self.config)[0]
            row["gold_paragraph_answer"] = alone["answer"]
            row.update({f"gold_paragraph_{name}": value
                        for name, value in scored(alone["answer"], row["answers"]["text"]).items()})
            del row["context"], row["answers"]
        return pa.Table.from_pylist(rows)


def scored(answer: str, golds: list[str]) -> dict:
    """Exact match and F1 of one answer; with no golds (its article is not in the library) right
    only when it declines."""
    scores = question_scores(answer, golds)
    return {"exact_match": scores["v2_exact"], "f1": scores["v2_f1"]}


def summarise(rows: list[dict], passages: int, prefixes=("",)) -> dict:
    """Retrieval and reading over the questions whose article is in the library (``absent`` false),
    then the served answer over all: its score's calibration against exact match, selective answering
    and, with absent articles, how well the no-answer probability tells them apart. Each ``prefix``
    (``""`` as served, ``one_paragraph_``: the one-paragraph calibration) gets the served figures."""
    from sklearn.metrics import roc_auc_score

    present = [row for row in rows if not row["absent"]]
    count = len(present)
    metrics = {"questions": len(rows), "absent_questions": len(rows) - count, "passages_read": passages}
    for mode in SEARCH_MODES:
        for k in RECALL_AT:
            metrics[f"{mode}_recall@{k}"] = recall_at([row[f"{mode}_rank"] for row in present], k)
    for k in (k for k in RECALL_AT if k <= passages):  # the hybrid top `passages`, as the reader ranks them
        metrics[f"reader_recall@{k}"] = recall_at([row["reader_rank"] for row in present], k)
    for prefix in ("", "gold_paragraph_"):
        for name in ("exact_match", "f1"):
            metrics[f"{prefix}{name}"] = round(100 * sum(row[f"{prefix}{name}"] for row in present) / count, 2)
    metrics["abstained"] = sum(row["answer"] == "" for row in present)
    metrics["f1_ratio"] = round(metrics["f1"] / metrics["gold_paragraph_f1"], 4) if metrics["gold_paragraph_f1"] else None
    # The served response, end to end: is a top answer ("not in the library" included) with score 0.8
    # right 8 times in 10, and how many questions could be answered at a precision a clinician
    # would accept (highest scores first, the rest declined)?
    for prefix in prefixes:
        scores, right = [row[f"{prefix}score"] for row in rows], [row[f"{prefix}exact_match"] == 1 for row in rows]
        metrics[f"{prefix}served_exact_match"] = round(100 * sum(right) / len(rows), 2)
        metrics[f"{prefix}served_f1"] = round(100 * sum(row[f"{prefix}f1"] for row in rows) / len(rows), 2)
        metrics[f"{prefix}score_ece"] = round(expected_calibration_error(scores, right), 4)
        for precision in SELECTIVE_PRECISIONS:
            metrics[f"{prefix}answered_at_{round(100 * precision)}_precision"] = round(
                answered_at_precision(scores, right, precision), 4)
        if metrics["absent_questions"] and count:
            metrics[f"{prefix}absent_declined"] = round(sum(row[f"{prefix}answer"] == "" for row in rows
                                                            if row["absent"]) / metrics["absent_questions"], 4)
            metrics[f"{prefix}absent_no_answer_auc"] = round(float(roc_auc_score(
                [row["absent"] for row in rows], [row[f"{prefix}no_answer_probability"] for row in rows])), 4)
        metrics[f"{prefix}score_reliability"] = reliability(scores, right)
    return metrics


def plot_reliability(metrics: dict, path: Path) -> None:
    """The reliability diagram of the served score, end to end (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.6, 4.4))
    bins = [b for b in metrics["score_reliability"] if b["count"]]
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect")
    axis.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "s-",
              label=f"as served (ECE {metrics['score_ece']:.3f})")
    if "one_paragraph_score_reliability" in metrics:
        other = [b for b in metrics["one_paragraph_score_reliability"] if b["count"]]
        axis.plot([b["confidence"] for b in other], [b["accuracy"] for b in other], "o--", alpha=0.7,
                  label=f"one-paragraph calibration (ECE {metrics['one_paragraph_score_ece']:.3f})")
    axis.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["count"] / metrics["questions"] for b in bins],
             width=0.08, alpha=0.25, label="share of questions")
    axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="score of the top answer (bin mean)", ylabel="share exactly right",
             title=f"asked of the library: {metrics['questions']} questions")
    axis.legend(loc="upper left", fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def evaluate(args: argparse.Namespace) -> dict:
    import ray.data

    records = read_squad(args.data)
    skipped = {r.get("title", "") for r in read_squad(args.skip_articles_of)} if args.skip_articles_of else set()
    # A share of the articles asked about (not of those skipped) is left out of the library.
    absent = absent_articles([r for r in records if r.get("title", "") not in skipped], args.absent_articles, args.seed)
    if args.documents:
        if not Path(args.documents).is_dir():
            raise ValueError(f"--documents {args.documents}: not a folder of documents")
        documents, name_of = None, folder_documents(Path(args.documents), {r["context"] for r in records})
    else:
        documents, name_of = squad_documents([r for r in records if r.get("title", "") not in absent],
                                             args.one_document_per)
    questions = sample_questions([r for r in records if r.get("title", "") not in skipped], args.max_questions,
                                 seed=args.seed)
    model_dir = check_model_dir(args.model)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    connect_ray(args.address)
    pool = ActorPool.fit(args, items=len(questions))
    started = time.perf_counter()
    if args.library:
        library = Path(args.library)
    elif documents is None:
        library = index_folder(Path(args.documents), output / "library" / "index", args.address, args.embedder)
    else:
        library = build_library(documents, output, args.address, args.embedder)
    indexed_s = time.perf_counter() - started
    rows = [{"id": r["id"], "question": r["question"], "context": r["context"], "answers": r["answers"],
             # absent: its paragraph is in no document of the library
             "document": name_of.get(r["context"], ""), "absent": r["context"] not in name_of} for r in questions]
    shown = f"the documents of {args.documents}" if documents is None else \
        f"{len(documents)} {args.one_document_per}s as documents"
    print(f"[evaluate] {shown}; {len(rows)} questions ({sum(row['absent'] for row in rows)} of them absent), "
          f"{pool.actors} actor(s)", flush=True)
    answered = ray.data.from_items(rows).map_batches(
        LibraryAsker, fn_constructor_kwargs={"library": str(library.resolve()), "model_dir": model_dir,
                                             "passages": args.passages, "threads": pool.threads},
        batch_size=args.batch_size, compute=ray.data.ActorPoolStrategy(size=pool.actors), batch_format="pyarrow",
        **pool.per_actor)
    results = []
    with (output / "answers.jsonl").open("w", encoding="utf-8") as stream:
        for row in answered.iter_rows():
            results.append(row)
            stream.write(json.dumps(row, ensure_ascii=False) + "\n")
    prefixes = ("", "one_paragraph_") if results and "one_paragraph_score" in results[0] else ("",)  # as the asker chose
    served = load_qa_config(model_dir).over_passages()
    metrics = {**summarise(results, args.passages, prefixes), "documents": len(set(name_of.values())),
               "served_settings": {"no_answer_threshold": served.no_answer_threshold,
                                   "passage_rank_weight": served.passage_rank_weight,
                                   "score": "logistic model" if served.answer_confidence else "softmax share"},
               "one_document_per": "file" if documents is None else args.one_document_per, "model": model_dir,
               "data": str(args.data), "index_s": round(indexed_s, 1),
               "answer_s": round(time.perf_counter() - started - indexed_s, 1)}
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    plot_reliability(metrics, output / "reliability.png")
    print(json.dumps({k: v for k, v in metrics.items() if not k.endswith("score_reliability")}, indent=2), flush=True)
    return metrics


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="reader model directory (python -m train_job's OUTPUT_DIR/model)")
    parser.add_argument("--data", required=True, help="SQuAD-format file with gold answers")
    parser.add_argument("--output", required=True, help="output directory (metrics.json, answers.jsonl, the library)")
    parser.add_argument("--library", default=None, help="a library of --data's paragraphs built by this command before")
    parser.add_argument("--one-document-per", choices=DOCUMENT_SHAPES, default="paragraph",
                        help="what each document of the library holds: a paragraph, or a whole article (long "
                             "documents, many passages each; default: %(default)s)")
    parser.add_argument("--documents", default=None,
                        help="a folder of real documents to build the library from instead (e.g. the bundled "
                             "train_job/quickstart_data/library): a question's document is the one holding its "
                             "paragraph; a question none holds is asked as absent")
    add_embedder_flag(parser)
    parser.add_argument("--passages", type=at_least(1), default=PASSAGES_READ,
                        help="passages read per question (default: %(default)s, as /v1/ask)")
    parser.add_argument("--absent-articles", type=float, default=0.0,
                        help="a seeded share of the articles left out of the library; their questions are still "
                             "asked, and declining is their right answer (default: 0; mine's is 0.1)")
    parser.add_argument("--skip-articles-of", default=None,
                        help="a SQuAD-format file (e.g. what a calibration was fitted on): questions of its articles "
                             "are not asked; their paragraphs stay in the library")
    parser.add_argument("--max-questions", type=at_least(1), default=None, help="a seeded sample spread over the articles")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed (default: 0)")
    add_actor_flags(parser, "actors")
    parser.add_argument("--batch-size", type=at_least(1), default=32, help="questions per actor call (default: 32)")
    add_address_flag(parser)


run = evaluate
USER_ERRORS = (SquadFormatError, OSError, ValueError)  # what a user can fix: exit 2 with the message
