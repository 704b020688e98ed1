"""Does ``train_job.dropout`` learn as PyTorch's dropout does? The same steps under several dropout seeds.

    python -m bench.dropout_seeds                      # 200 steps, seeds run,7,11,13, both dropouts
    python -m bench.dropout_seeds --steps 100 --seeds 7 --threads 1

The squad-minilm preset's windows (``bench.train_limits``: 3,000 SQuAD train questions and their
negatives), the same batches in the same order, the preset's optimiser and schedule, bf16 autocast;
each run in a fresh process. Only the dropout masks differ: ``torch`` draws them with PyTorch's
dropout, ``cheap`` with ``train_job.dropout`` (``--cheap-dropout``). A seed
re-seeds the generator after the model is loaded; ``run`` keeps the stream the run's own seed gives.
The spread between seeds of one kind is the bound a difference between the kinds is judged against.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from bench import benchlib
from bench.preset_step import prepare_features, preset_steps

DEFAULT_OUT = benchlib.RESULTS / "dropout_seeds.json"
KINDS = ("torch", "cheap")
PARTS = 8  # the loss curve is reported as the mean of each eighth of the steps


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.dropout_seeds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="SQuAD training file (default: as bench.train_limits)")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2", help="model (default: %(default)s)")
    parser.add_argument("--questions", type=int, default=3000, help="training questions sampled (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=200, help="steps per run (default: %(default)s)")
    parser.add_argument("--seeds", default="run,7,11,13", help="dropout seeds, 'run' for none (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: every core)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file (default: %(default)s)")
    parser.add_argument("--run", nargs=2, metavar=("KIND", "SEED"), default=None, help=argparse.SUPPRESS)  # internal
    parser.add_argument("--features", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.seeds = [seed.strip() for seed in args.seeds.split(",") if seed.strip()]
    if args.steps < PARTS:
        parser.error(f"--steps must be at least {PARTS}")
    return args


def run_one(args) -> dict:
    """One run in this (fresh) process: the loss of every step."""
    kind, seed = args.run
    steps = preset_steps(args.model, dict(np.load(args.features)), args.steps, cheap_dropout=kind == "cheap",
                         dropout_seed=None if seed == "run" else int(seed), threads=args.threads)
    started = time.perf_counter()
    losses = [step["loss"] for step in steps]
    return {"kind": kind, "seed": seed, "losses": losses, "seconds_per_step": (time.perf_counter() - started) / len(losses)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run:
        benchlib.quiet_libraries()
        return benchlib.report_to_parent(run_one(args))
    return benchlib.run_in_workdir(measure, args, prefix="bench-dropout-")


def measure(args, workdir: Path, load_before: list[float]) -> int:
    benchlib.quiet_libraries()
    features = workdir / "features.npz"
    data = prepare_features(args, features)
    rows = []
    for seed in args.seeds:
        for kind in KINDS:
            print(f"{kind} dropout, seed {seed}: {args.steps} steps in a fresh process", flush=True)
            flags = ["--run", kind, seed, "--features", str(features), "--steps", str(args.steps), "--model", args.model]
            flags += ["--threads", str(args.threads)] if args.threads else []
            run = benchlib.in_fresh_process("bench.dropout_seeds", *flags)
            curve = np.array_split(np.array(run["losses"]), PARTS)
            rows.append({**run, "loss_per_eighth": [round(float(part.mean()), 3) for part in curve],
                         "loss_last_eighth": float(curve[-1].mean()), "loss_last_half": float(np.concatenate(curve[PARTS // 2:]).mean())})
    summary = {}
    for kind in KINDS:
        last = [row["loss_last_eighth"] for row in rows if row["kind"] == kind]
        summary[f"{kind}_loss_last_eighth_mean"] = float(np.mean(last))
        summary[f"{kind}_loss_last_eighth_spread"] = float(np.ptp(last))
    summary["cheap_minus_torch_loss_last_eighth"] = summary["cheap_loss_last_eighth_mean"] - summary["torch_loss_last_eighth_mean"]
    benchlib.print_table("Loss per eighth of the steps", rows, ["kind", "seed", "loss_per_eighth", "loss_last_half", "seconds_per_step"])
    benchlib.print_table("Ratios", [{"ratio": k, "value": v} for k, v in summary.items()], ["ratio", "value"])
    benchlib.write_json(args.out, "dropout_seeds", summary, {"runs": rows},
                        {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, **data}, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
