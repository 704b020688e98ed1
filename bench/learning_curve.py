"""The learning curve of the squad-minilm preset: EM/F1 on the whole SQuAD v1.1 dev set against training size.

    python -m bench.learning_curve                                   # one article (269), 2,000, 8,000 questions
    python -m bench.learning_curve --points 2000 --runs-dir /tmp/lc  # one point

Each point is the preset as a user runs it (``python -m train_job --preset squad-minilm``, the same
held-out validation articles, negatives and calibration) with ``--max-train-samples N``; ``N-first``
takes the file's first N questions instead of a spread sample (``first-269`` is the first article,
what the project trained on before). Each model then answers the full dev set with
``python -m bench.squad_accuracy --sets dev``: EM/F1 as served (its threshold and calibration, the
figures ``train_job.predict`` prints) and always answering, from one forward pass. ``--preset-run``
adds the preset's own run (16,000 questions, its 60 minutes; its training time read from
``bench/results/squad_minilm_train.json``). Wall times are whole commands: run it alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import benchlib

DEFAULT_OUT = benchlib.RESULTS / "learning_curve.json"
PRESET_TRAIN = benchlib.RESULTS / "squad_minilm_train.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.learning_curve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default="first-269,2000,8000",
                        help="comma-separated training sizes; N-first for the file's first N questions")
    parser.add_argument("--train", type=Path, default=benchlib.SQUAD_FULL_TRAIN, help="SQuAD-format train file")
    parser.add_argument("--dev", type=Path, default=benchlib.SQUAD_FULL_DEV, help="SQuAD-format dev file")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/learning-curve"),
                        help="one run directory per point under here")
    parser.add_argument("--preset-run", type=Path, default=None,
                        help="the preset's run directory (python -m train_job --preset squad-minilm), evaluated too")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--plot", type=Path, default=benchlib.RESULTS / "learning_curve.png")
    return parser.parse_args(argv)


def parse_point(text: str) -> tuple[int, str]:
    how, _, size = text.strip().rpartition("-")
    if how not in ("", "first") or not size.isdigit():
        raise SystemExit(f"--points: {text!r} is not N or first-N")
    return int(size), how or "spread"


def timed(command: list[str]) -> float:
    print("+", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return round(time.perf_counter() - started, 1)


def run_point(size: int, how: str, args: argparse.Namespace) -> dict:
    run_dir = args.runs_dir / (f"{how}-{size}" if how == "first" else str(size))
    train_s = timed([sys.executable, "-m", "train_job", "--preset", "squad-minilm", "--train-file", str(args.train),
                     "--max-train-samples", str(size), "--sample", how, "--output-dir", str(run_dir),
                     "--overwrite"])
    return evaluate_point(size, how, train_s, run_dir, args)


def evaluate_point(size: int, how: str, command_s: float, run_dir: Path, args: argparse.Namespace) -> dict:
    accuracy = run_dir / "squad_accuracy_dev.json"
    evaluate_s = timed([sys.executable, "-m", "bench.squad_accuracy", "--model", str(run_dir / "model"),
                        "--dev", str(args.dev), "--sets", "dev", "--out", str(accuracy)])
    trained = json.loads((run_dir / "metrics.json").read_text())
    dev = json.loads(accuracy.read_text())["results"]["dev"]
    served, always = dev["served"], dev["always_answering"]
    return {"questions": size, "sample": how, "train_command_s": command_s,
            "train_runtime_s": round(trained["train_runtime_s"], 1),
            "windows_per_s": round(trained["train_samples_per_second"], 2),
            "validation_f1": round(trained["f1"], 2), "dev_exact_match": round(served["exact_match"], 2),
            "dev_f1": round(served["f1"], 2), "dev_abstained": dev["abstained"],
            "dev_exact_match_always_answering": round(always["exact_match"], 2),
            "dev_f1_always_answering": round(always["f1"], 2), "dev_questions": dev["questions"],
            "evaluate_command_s": evaluate_s}


def preset_row(run_dir: Path, args: argparse.Namespace) -> dict:
    trained = json.loads(PRESET_TRAIN.read_text())
    settings = trained["metrics"]["fingerprint"]["settings"]
    return evaluate_point(settings["max_train_samples"], settings["sample"], trained["whole_command_wall_s"], run_dir, args)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [row["questions"] for row in rows]
    ax.plot(sizes, [row["dev_f1"] for row in rows], "o-", label="F1 as served")
    ax.plot(sizes, [row["dev_exact_match"] for row in rows], "s--", label="EM as served")
    ax.plot(sizes, [row["dev_f1_always_answering"] for row in rows], "^:", label="F1 always answering")
    for row in rows:
        ax.annotate(f"{row['train_command_s'] / 60:.0f} min", (row["questions"], row["dev_f1"]),
                    textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.axhline(72, color="grey", linewidth=0.8, linestyle=":", label="target F1 72")
    ax.set_xscale("log")
    ax.set_xlabel("training questions (log scale)")
    ax.set_ylabel("SQuAD v1.1 dev (10,570 questions)")
    ax.set_title("squad-minilm preset: learning curve on 2 CPU cores")
    ax.legend(loc="lower right")
    benchlib.save_figure(fig, path, dpi=120)


def main(argv=None) -> None:
    args = parse_args(argv)
    load_before = benchlib.load_average()
    rows = [run_point(*parse_point(text), args) for text in args.points.split(",")]
    if args.preset_run:
        rows.append(preset_row(args.preset_run, args))
    rows.sort(key=lambda row: row["questions"])
    benchlib.print_table("learning curve", rows, list(rows[0]))
    plot(rows, args.plot)
    benchlib.write_json(args.out, "learning_curve", {}, {"points": rows},
                        {"train": benchlib.data_label(args.train), "dev": benchlib.data_label(args.dev),
                         "points": args.points}, load_before)


if __name__ == "__main__":
    main()
