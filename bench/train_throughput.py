"""Training throughput: the seed recipe (HF Trainer) against our Ray Train loop, in one run.

    python -m bench.train_throughput                      # CPU: BERT-mini shape, seq 384, minutes on 2 cores
    python -m bench.train_throughput --ablate             # + our loop again with length grouping off, compile flipped
    python -m bench.train_throughput --gpu                # bert-base-cased shape, seq 384, fp16 seed / bf16 ours

Both recipes (``bench.train_recipes``) train the same model (same shape, same initial weights) on the
same training windows (``qa_common.prepare_train_features`` of the same questions). The other
training benchmarks: ``bench.train_scaling`` (1 vs 2 Ray Train workers) and ``bench.train_variants``
(the loop's step in-process, each speed feature on and off).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import benchlib
from bench.train_recipes import OurRuns, add_common_flags, finish_common_flags, prepare, run_seed, settings_of

DEFAULT_OUT = benchlib.RESULTS / "train_throughput.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_throughput", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_flags(parser)
    parser.add_argument("--seed-batch-size", type=int, default=8, help="HF Trainer per-device batch (seed: 8)")
    parser.add_argument("--seed-steps", type=int, default=None,
                        help="timed HF Trainer steps after the warm-up (default 10 on CPU, 60 with --gpu)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed HF Trainer steps first (default: 2)")
    parser.add_argument("--ablate", action="store_true",
                        help="also run our loop with length grouping off (and compile flipped), one Ray Train run each")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file (default: %(default)s)")
    args = finish_common_flags(parser.parse_args(argv))
    args.seed_steps = args.seed_steps or (60 if args.gpu else 10)
    if args.warmup_steps < 1:
        parser.error("--warmup-steps must be at least 1 (the first step is never timed)")
    return args


def main(argv=None) -> int:
    return benchlib.run_in_workdir(measure, parse_args(argv), prefix="bench-train-")


def measure(args, workdir: Path, load_before: list[float]) -> int:
    prepared = prepare(args, workdir)
    print("[bench] seed recipe: HF Trainer ...", flush=True)
    seed = {**run_seed(args, prepared["model_dir"], prepared["features"], workdir), "load_average": benchlib.load_average()}
    runs = OurRuns(args, prepared, workdir)
    with benchlib.local_ray(max(args.cpus, 2)):  # at least 2 for a 2-worker run
        ours = runs.fit("ours", "ours: train_job (Ray Train)")
        results = {"seed": seed, "ours": ours}
        ratios = {"ours_vs_seed_features_per_s": benchlib.ratio(ours["features_per_s"], seed["features_per_s"])}
        if args.ablate:
            results["ablation"] = []
            for name, value in (("group_by_length", not ours["group_by_length"]), ("compile", not ours["compile"])):
                row = runs.fit(f"ablate-{name}", f"ours, {name}={value}", **{name: value})
                results["ablation"].append(row)
                ratios[f"ours_default_vs_{name}_{value}"] = benchlib.ratio(ours["features_per_s"], row["features_per_s"])
    rows = [seed, ours, *results.get("ablation", [])]
    benchlib.print_table("Ratios", [{"ratio": name, "value": value} for name, value in ratios.items()], ["ratio", "value"])
    benchlib.print_table("Training throughput (features/s, excluding start-up)", rows,
                         ["recipe", "precision", "batch_size", "workers", "features_per_s", "step_s", "overhead_s",
                          "load_average"])
    benchlib.write_json(args.out, "train_throughput", ratios, results, settings_of(args, prepared), load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
