"""Does training with synthesised negatives make a model that says "not in this document" when it should?

    python -m bench.abstention_accuracy                      # the SQuAD sample articles, packaged MiniLM
    python -m bench.abstention_accuracy --epochs 2           # quicker

Trains the quickstart recipe (packaged all-MiniLM-L6-v2, 256-token windows, stride 96) twice on the
Notre Dame article of the SQuAD v1.1 sample: once with ``--negative-ratio 1`` (one unanswerable
question synthesised per answerable one), once without (a model that always answers). The Super
Bowl article is made SQuAD 2.0-like: half of its questions, chosen with a seed, are moved onto a
paragraph that holds none of their answers and become unanswerable. Two ways of choosing that
paragraph, each a test of its own for the same two models:

- ``notre-dame``: a Notre Dame paragraph, i.e. a paragraph the model trained on;
- ``unseen``: a paragraph of another article of the full SQuAD v1.1 dev set (when
  ``../shared/data/squad-v1.1-full/`` is there), one the model has never seen.

The Super Bowl paragraphs are split in two halves: the first is the validation set (training's
per-epoch evaluation and the no-answer threshold the export stores use the ``notre-dame`` one), the
second the test set. Each model answers as it would be served (``answer_questions`` with its
``qa_config.json``); for each design the threshold is the one with the best F1 on that design's
validation half (for ``notre-dame`` this is the exported threshold), and the test half is scored
with the official SQuAD 2.0 metric, along with the ROC AUC of the no-answer probabilities (how well
they rank unanswerable questions above answerable ones, whatever the threshold). Everything is
written to a temporary directory and removed (``--keep DIR`` keeps the two model directories;
``--reuse`` scores the ones already there instead of training again).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from bench import benchlib

DEFAULT_OUT = benchlib.RESULTS / "abstention_accuracy.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.abstention_accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-data", type=Path, default=benchlib.SQUAD_SAMPLE_TRAIN,
                        help="answerable training questions (default: the Notre Dame article)")
    parser.add_argument("--eval-data", type=Path, default=benchlib.SQUAD_SAMPLE_DEV,
                        help="questions to make half unanswerable (default: the Super Bowl article)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--negative-ratio", type=float, default=1.0)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (one worker takes them all)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--keep", type=Path, default=None, help="copy the two trained model directories here")
    parser.add_argument("--reuse", action="store_true",
                        help="evaluate the model directories already in --keep DIR instead of training them again")
    args = parser.parse_args(argv)
    if args.reuse and not args.keep:
        parser.error("--reuse needs --keep DIR")
    return args


def main(argv=None) -> int:
    return benchlib.run_in_workdir(measure, parse_args(argv), prefix="bench-abstention-")


def half_unanswerable(records: list[dict], borrowed_paragraphs: list[dict], seed: int, source: str = "other") -> list[dict]:
    """``records`` with a seeded half of the questions moved onto a paragraph of ``borrowed_paragraphs``
    holding none of their answers, of the same article or another (``source``, as
    ``qa_common.synthesise_negatives``); questions without such a paragraph stay answerable."""
    from qa_common import synthesise_negatives

    rng = random.Random(seed)
    chosen = set(rng.sample(range(len(records)), len(records) // 2))
    negatives = synthesise_negatives([records[i] for i in sorted(chosen)], 1, seed=seed, paragraphs=borrowed_paragraphs,
                                     source=source)
    negative_of = {negative["id"].rsplit("-neg", 1)[0]: negative for negative in negatives}
    return [negative_of.get(record["id"], record) if i in chosen else record for i, record in enumerate(records)]


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def build_eval_sets(args, workdir: Path) -> tuple[Path, dict[str, tuple[list[dict], list[dict]]]]:
    """Training's validation file, and ``{design: (validation records, test records)}``."""
    from qa_common import read_squad

    notre_dame, super_bowl = read_squad(args.train_data), read_squad(args.eval_data)
    borrowed = {"notre-dame": notre_dame}
    if benchlib.SQUAD_FULL_DEV.is_file():
        titles = {record.get("title") for record in super_bowl}
        borrowed["unseen"] = [r for r in read_squad(benchlib.SQUAD_FULL_DEV) if r.get("title") not in titles]
    # Split by the original paragraph, so no paragraph's questions are in both halves.
    original_context = {record["id"]: record["context"] for record in super_bowl}
    paragraphs = list(dict.fromkeys(original_context.values()))
    validation_paragraphs = set(paragraphs[: len(paragraphs) // 2])
    sets = {}
    for design, paragraphs_to_borrow in borrowed.items():
        made = half_unanswerable(super_bowl, paragraphs_to_borrow, args.seed)
        in_validation = [original_context[r["id"].rsplit("-neg", 1)[0]] in validation_paragraphs for r in made]
        sets[design] = ([r for r, v in zip(made, in_validation) if v], [r for r, v in zip(made, in_validation) if not v])
    return write_jsonl(sets["notre-dame"][0], workdir / "validation-v2.jsonl"), sets


def train(args, workdir: Path, validation_file: Path, negative_ratio: float) -> tuple[Path, dict]:
    from qa_common import MINILM, QAConfig
    from train_job.config import TrainConfig
    from train_job.run import run

    output = workdir / f"negatives-{negative_ratio:g}"
    config = TrainConfig(
        model=MINILM, train_file=str(args.train_data), validation_file=str(validation_file), output_dir=str(output),
        epochs=args.epochs, learning_rate=args.learning_rate, per_device_batch_size=8, cpus_per_worker=args.cpus,
        negative_ratio=negative_ratio, seed=args.seed, max_failures=2, qa=QAConfig(max_length=256, stride=96),
    ).validate()
    clock = benchlib.Stopwatch()
    metrics = run(config)
    metrics["bench_wall_s"] = clock()
    return output / "model", metrics


def test_scores(model_dir: Path, validation: list[dict], test: list[dict]) -> dict:
    """The official SQuAD 2.0 metrics on ``test`` at the threshold with the best F1 on ``validation``.

    A model that abstains answers each question with its best span and that span's no-answer
    probability, and declines where the probability exceeds the threshold -- what serving does with
    the exported threshold. A model that always answers is scored as it answers.
    """
    from qa_common import Question, answer_questions, load_model_and_tokenizer, load_qa_config, squad_v2_metrics

    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    config = load_qa_config(model_dir)

    def best_spans(records):
        """``(predictions, references, no-answer probabilities)``, as squad_v2_metrics takes them."""
        questions = [Question(r["question"], r["context"], allow_no_answer=False) for r in records]
        answers = answer_questions(model.eval(), tokenizer, questions, config)
        return ({r["id"]: best["answer"] for r, [best] in zip(records, answers)},
                {r["id"]: r["answers"]["text"] for r in records},
                {r["id"]: best["no_answer_probability"] for r, [best] in zip(records, answers)})

    texts, golds, na_probs = best_spans(test)
    ranking = {"no_answer_auc": no_answer_auc(na_probs, golds),
               "HasAns_f1_if_never_abstaining": squad_v2_metrics(texts, golds)["HasAns_f1"]}
    if not config.version_2_with_negative:
        return {**squad_v2_metrics(texts, golds), **ranking, "abstains": False, "abstained": 0}
    threshold = squad_v2_metrics(*best_spans(validation))["best_f1_thresh"]
    scores = squad_v2_metrics(texts, golds, na_probs, na_prob_thresh=threshold)
    return {**scores, **ranking, "abstains": True, "no_answer_threshold": threshold,
            "exported_no_answer_threshold": config.no_answer_threshold,
            "abstained": sum(1 for p in na_probs.values() if p > threshold)}


def no_answer_auc(na_probs: dict, golds: dict) -> float:
    """ROC AUC of the no-answer probability for "unanswerable": 1 ranks every unanswerable question
    above every answerable one, 0.5 is chance, below 0.5 the ranking is backwards."""
    import numpy as np

    unanswerable = np.array([na_probs[q] for q in golds if not golds[q]])
    answerable = np.array([na_probs[q] for q in golds if golds[q]])
    above = (unanswerable[:, None] > answerable[None, :]).mean()
    return float(above + 0.5 * (unanswerable[:, None] == answerable[None, :]).mean())


def measure(args, workdir: Path, load_before: list[float]) -> int:
    import shutil

    validation_file, eval_sets = build_eval_sets(args, workdir)
    rows, results = [], {}
    with benchlib.local_ray(args.cpus):
        for label, ratio in (("with negatives", args.negative_ratio), ("without (always answers)", 0.0)):
            kept = args.keep / f"negatives-{ratio:g}" if args.keep else None
            if args.reuse and kept.is_dir():
                model_dir, train_metrics = kept, {"history": [], "reused": str(kept), "bench_wall_s": None}
            else:
                model_dir, train_metrics = train(args, workdir, validation_file, ratio)
                if kept:
                    shutil.copytree(model_dir, kept, dirs_exist_ok=True)
            results[label] = {"validation": {k: v for k, v in train_metrics.items() if k != "history"},
                              "history": train_metrics["history"]}
            for design, (validation, test) in eval_sets.items():
                scores = test_scores(model_dir, validation, test)
                results[label][f"test ({design})"] = scores
                rows.append({"unanswerable on": design, "model": label, "HasAns F1": scores["HasAns_f1"],
                             "NoAns accuracy": scores.get("NoAns_exact", 0.0), "F1": scores["f1"],
                             "EM": scores["exact"], "abstained": scores["abstained"],
                             "threshold": scores["no_answer_threshold"] if scores["abstains"] else "-",
                             "no-answer AUC": scores["no_answer_auc"],
                             "train s": train_metrics["bench_wall_s"]})
    rows.sort(key=lambda row: row["unanswerable on"] != "notre-dame")
    test_sizes = {design: len(test) for design, (_, test) in eval_sets.items()}
    title = f"Abstention on {max(test_sizes.values())} test questions (half unanswerable), official SQuAD 2.0 metric, percent"
    benchlib.print_table(title, rows, list(rows[0]))
    with_negatives, without = (results[label] for label in results)
    ratios = {}
    for design in eval_sets:
        key = f"test ({design})"
        ratios[f"f1_gain ({design})"] = with_negatives[key]["f1"] - without[key]["f1"]
        ratios[f"has_ans_f1_drop ({design})"] = without[key]["HasAns_f1"] - with_negatives[key]["HasAns_f1"]
    settings = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "test_questions": test_sizes, "max_length": 256, "stride": 96, "per_device_batch_size": 8}
    benchlib.write_json(args.out, "abstention_accuracy", ratios, results, settings, load_before)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
