"""Which synthesised negatives generalise: paragraphs of the same article, of other articles, a mix, or none.

    python -m bench.negative_sources                                  # 1,000 questions per model
    python -m bench.negative_sources --sources article,other,mix --holdout-questions 500   # quicker
    python -m bench.negative_sources --train-questions 4000 --sources article,mix

Trains the squad-minilm preset on ``--train-questions`` SQuAD v1.1 questions once per
``--negative-source`` (``none``: ``--negative-ratio 0``, a model that always answers), then scores
each with ``python -m bench.squad_accuracy --sets article,other`` on a seeded sample of the dev set
with half of its questions moved onto a paragraph holding none of their answers, of the same
article and of another one: overall and HasAns F1 as served, and the no-answer ROC AUC. The
thresholds and calibration are each model's own (its held-out training articles), never the dev set's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench import benchlib

DEFAULT_OUT = benchlib.RESULTS / "negative_sources.json"
SOURCES = ("none", "article", "other", "mix")
SETS = {"half unanswerable (same article)": "same article", "half unanswerable (another article)": "other article"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.negative_sources", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", default=",".join(SOURCES), help="comma-separated, of: " + ", ".join(SOURCES))
    parser.add_argument("--train-questions", type=int, default=1000)
    parser.add_argument("--eval-questions", type=int, default=1000, help="dev questions per test set")
    parser.add_argument("--holdout-questions", type=int, default=None,
                        help="questions of held-out training articles to validate on (default: the preset's)")
    parser.add_argument("--train", type=Path, default=benchlib.SQUAD_FULL_TRAIN, help="SQuAD-format train file")
    parser.add_argument("--dev", type=Path, default=benchlib.SQUAD_FULL_DEV, help="SQuAD-format dev file")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/negative-sources"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    unknown = set(args.sources.split(",")) - set(SOURCES)
    if unknown:
        parser.error(f"--sources: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SOURCES)}")
    return args


def train_and_score(source: str, args: argparse.Namespace) -> dict:
    run_dir = args.runs_dir / source
    negatives = ["--negative-ratio", "0"] if source == "none" else ["--negative-source", source]
    if args.holdout_questions:
        negatives += ["--holdout-questions", str(args.holdout_questions)]
    subprocess.run([sys.executable, "-m", "train_job", "--preset", "squad-minilm", "--train-file", str(args.train),
                    "--max-train-samples", str(args.train_questions), *negatives, "--output-dir", str(run_dir),
                    "--overwrite"], check=True)
    scored = run_dir / "squad_accuracy.json"
    subprocess.run([sys.executable, "-m", "bench.squad_accuracy", "--model", str(run_dir / "model"), "--dev",
                    str(args.dev), "--max-questions", str(args.eval_questions), "--sets", "article,other",
                    "--out", str(scored)], check=True)
    results = json.loads(scored.read_text())["results"]
    row = {"negatives": source}
    for name, label in SETS.items():
        served = results[name]["served"]
        row[f"F1 {label}"] = round(served["f1"], 2)
        row[f"HasAns F1 {label}"] = round(served["HasAns_f1"], 2)
        row[f"AUC {label}"] = round(results[name].get("no_answer_auc", float("nan")), 3)
    return row


def main(argv=None) -> None:
    args = parse_args(argv)
    load_before = benchlib.load_average()
    rows = [train_and_score(source, args) for source in args.sources.split(",")]
    benchlib.print_table(f"negative sources, {args.train_questions} training questions", rows, list(rows[0]))
    benchlib.write_json(args.out, "negative_sources", {}, {"models": rows},
                        {"train_questions": args.train_questions, "eval_questions": args.eval_questions,
                         "train": benchlib.data_label(args.train), "dev": benchlib.data_label(args.dev)}, load_before)


if __name__ == "__main__":
    main()
