"""The learning curve of the squad-minilm preset: EM/F1 on the whole SQuAD v1.1 dev set against training size.

    python -m bench.learning_curve                                   # one article (269), 2,000, 8,000 questions
    python -m bench.learning_curve --points 2000 --runs-dir /tmp/lc  # one point

Each point is the preset as a user runs it (``python -m train_job --preset squad-minilm``, the same
held-out validation articles, negatives and calibration) with ``--max-train-samples N``; ``N-first``
takes the file's first N questions instead of a spread sample (``first-269`` is the first article,
what the project trained on before). Each model then answers the full dev set with
``python -m bench.squad_accuracy --sets dev``: EM/F1 as served (its threshold and calibration, the
figures ``train_job.predict`` prints) and always answering, from one forward pass. A point whose run
directory holds its ``point.json`` from an earlier run is read, not run again. ``--with-preset`` adds
the preset's own 16,000-question run as recorded in ``bench/results/squad_minilm_train.json`` and
``squad_accuracy_full_dev.json``. Wall times are whole commands: run it alone.
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
PRESET_DEV = benchlib.RESULTS / "squad_accuracy_full_dev.json"
POINT = "point.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.learning_curve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default="first-269,2000,8000",
                        help="comma-separated training sizes; N-first for the file's first N questions")
    parser.add_argument("--train", type=Path, default=benchlib.SQUAD_FULL_TRAIN, help="SQuAD-format train file")
    parser.add_argument("--dev", type=Path, default=benchlib.SQUAD_FULL_DEV, help="SQuAD-format dev file")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/learning-curve"),
                        help="one run directory per point under here")
    parser.add_argument("--with-preset", action="store_true",
                        help=f"add the preset's recorded run ({PRESET_TRAIN.name}, {PRESET_DEV.name})")
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
    if (run_dir / POINT).exists():
        print(f"{run_dir / POINT}: measured before, read", flush=True)
        return json.loads((run_dir / POINT).read_text())
    command_s = timed([sys.executable, "-m", "train_job", "--preset", "squad-minilm", "--train-file", str(args.train),
                       "--max-train-samples", str(size), "--sample", how, "--output-dir", str(run_dir),
                       "--overwrite"])
    accuracy = run_dir / "squad_accuracy_dev.json"
    evaluate_s = timed([sys.executable, "-m", "bench.squad_accuracy", "--model", str(run_dir / "model"),
                        "--dev", str(args.dev), "--sets", "dev", "--out", str(accuracy)])
    row = point_row(size, how, command_s, json.loads((run_dir / "metrics.json").read_text()),
                    json.loads(accuracy.read_text())["results"]["dev"], evaluate_s)
    (run_dir / POINT).write_text(json.dumps(row, indent=2))
    return row


def point_row(size: int, how: str, command_s: float, trained: dict, dev: dict, evaluate_s: float) -> dict:
    served, always = dev["served"], dev["always_answering"]
    return {"questions": size, "sample": how, "train_command_s": command_s,
            "train_runtime_s": round(trained["train_runtime_s"], 1),
            "windows_per_s": round(trained["train_samples_per_second"], 2),
            "validation_f1": round(trained["f1"], 2), "dev_exact_match": round(served["exact_match"], 2),
            "dev_f1": round(served["f1"], 2), "dev_abstained": dev["abstained"],
            "dev_exact_match_always_answering": round(always["exact_match"], 2),
            "dev_f1_always_answering": round(always["f1"], 2), "dev_questions": dev["questions"],
            "evaluate_command_s": evaluate_s}


def preset_row() -> dict:
    recorded = json.loads(PRESET_TRAIN.read_text())
    trained = recorded["metrics"]
    settings = trained["fingerprint"]["settings"]
    dev = json.loads(PRESET_DEV.read_text())["results"]["dev"]
    return point_row(settings["max_train_samples"], settings["sample"], recorded["whole_command_wall_s"], trained,
                     dev, round(dev["seconds"], 1))


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
    if args.with_preset:
        rows.append(preset_row())
    rows.sort(key=lambda row: row["questions"])
    benchlib.print_table("learning curve", rows, list(rows[0]))
    plot(rows, args.plot)
    benchlib.write_json(args.out, "learning_curve", {}, {"points": rows},
                        {"train": benchlib.data_label(args.train), "dev": benchlib.data_label(args.dev),
                         "points": args.points, "with_preset": args.with_preset}, load_before)


if __name__ == "__main__":
    main()
