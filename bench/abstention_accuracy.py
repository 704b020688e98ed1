"""Does training with synthesised negatives make a model that says "not in this document" when it should?

    python -m bench.abstention_accuracy                      # the SQuAD sample articles, packaged MiniLM
    python -m bench.abstention_accuracy --epochs 2           # quicker

Trains the quickstart recipe (packaged all-MiniLM-L6-v2, 256-token windows, stride 96) twice on the
Notre Dame article of the SQuAD v1.1 sample: once with ``--negative-ratio 1`` (one unanswerable
question synthesised per answerable one), once without (a model that always answers). The Super
Bowl article is made SQuAD 2.0-like: half of its questions, chosen with a seed, are paired with a
Notre Dame paragraph that holds none of their answers and become unanswerable. Its paragraphs are
split in two halves: the first is the validation set (per-epoch evaluation and the choice of the
no-answer threshold the export stores), the second the test set, answered with each exported model
as it would be served (``answer_questions`` with its ``qa_config.json``) and scored with the
official SQuAD 2.0 metric. Everything is written to a temporary directory and removed.
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
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return benchlib.run_in_workdir(measure, parse_args(argv), prefix="bench-abstention-")


def half_unanswerable(records: list[dict], borrowed_paragraphs: list[dict], seed: int) -> list[dict]:
    """``records`` with a seeded half of the questions moved onto a paragraph of ``borrowed_paragraphs``
    holding none of their answers (questions without such a paragraph stay answerable)."""
    from qa_common import synthesise_negatives

    rng = random.Random(seed)
    chosen = set(rng.sample(range(len(records)), len(records) // 2))
    negatives = synthesise_negatives([records[i] for i in sorted(chosen)], 1, seed=seed, paragraphs=borrowed_paragraphs)
    negative_of = {negative["id"].rsplit("-neg", 1)[0]: negative for negative in negatives}
    return [negative_of.get(record["id"], record) if i in chosen else record for i, record in enumerate(records)]


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def build_eval_files(args, workdir: Path) -> tuple[Path, list[dict]]:
    """The validation file (first half of the paragraphs) and the test records (second half)."""
    from qa_common import read_squad

    notre_dame, super_bowl = read_squad(args.train_data), read_squad(args.eval_data)
    made = half_unanswerable(super_bowl, notre_dame, args.seed)
    # Split by the original paragraph, so no paragraph's questions are in both halves.
    original_context = {record["id"]: record["context"] for record in super_bowl}
    paragraphs = list(dict.fromkeys(original_context.values()))
    validation_paragraphs = set(paragraphs[: len(paragraphs) // 2])
    validation = [r for r in made if original_context[r["id"].rsplit("-neg", 1)[0]] in validation_paragraphs]
    test = [r for r in made if original_context[r["id"].rsplit("-neg", 1)[0]] not in validation_paragraphs]
    return write_jsonl(validation, workdir / "validation-v2.jsonl"), test


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


def test_scores(model_dir: Path, test: list[dict]) -> dict:
    """The official SQuAD 2.0 metrics of the served answers (the model's own qa_config.json)."""
    from qa_common import Question, answer_questions, load_model_and_tokenizer, load_qa_config, squad_v2_metrics

    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    config = load_qa_config(model_dir)
    answers = answer_questions(model.eval(), tokenizer, [Question(r["question"], r["context"]) for r in test], config)
    predictions = {record["id"]: best["answer"] for record, [best] in zip(test, answers)}
    scores = squad_v2_metrics(predictions, {record["id"]: record["answers"]["text"] for record in test})
    return {**scores, "abstains": config.version_2_with_negative, "no_answer_threshold": config.no_answer_threshold,
            "abstained": sum(1 for text in predictions.values() if not text)}


def measure(args, workdir: Path, load_before: list[float]) -> int:
    import ray

    validation_file, test = build_eval_files(args, workdir)
    benchlib.init_local_ray(args.cpus)
    rows, results = [], {}
    try:
        for label, ratio in (("with negatives", args.negative_ratio), ("without (always answers)", 0.0)):
            model_dir, train_metrics = train(args, workdir, validation_file, ratio)
            scores = test_scores(model_dir, test)
            results[label] = {"test": scores, "validation": {k: v for k, v in train_metrics.items() if k != "history"},
                              "history": train_metrics["history"]}
            rows.append({"model": label, "HasAns F1": scores["HasAns_f1"], "NoAns accuracy": scores["NoAns_exact"],
                         "F1": scores["f1"], "EM": scores["exact"], "abstained": scores["abstained"],
                         "threshold": scores["no_answer_threshold"] if scores["abstains"] else "-",
                         "train s": train_metrics["bench_wall_s"]})
    finally:
        ray.shutdown()
    title = f"Abstention on {len(test)} test questions (half unanswerable), official SQuAD 2.0 metric, percent"
    benchlib.print_table(title, rows, list(rows[0]))
    with_negatives, without = (results[label]["test"] for label in results)
    ratios = {"f1_gain": with_negatives["f1"] - without["f1"],
              "has_ans_f1_drop": without["HasAns_f1"] - with_negatives["HasAns_f1"]}
    settings = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "test_questions": len(test), "max_length": 256, "stride": 96, "per_device_batch_size": 8}
    benchlib.write_json(args.out, "abstention_accuracy", ratios, results, settings, load_before)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
