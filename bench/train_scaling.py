"""Data-parallel scaling of the Ray Train loop: the same run with 1 and with 2 workers.

    python -m bench.train_scaling --repeat 3 --epochs 1     # CPU: workers of 1 CPU each
    python -m bench.train_scaling --gpu                     # 1 GPU per worker (needs 2 GPUs)

Reports features/s per worker (kept = efficiency) and the speed-up of 2 workers over 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import benchlib
from bench.train_recipes import OurRuns, add_common_flags, finish_common_flags, prepare, settings_of

DEFAULT_OUT = benchlib.RESULTS / "train_scaling.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.train_scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file (default: %(default)s)")
    return finish_common_flags(parser.parse_args(argv))


def main(argv=None) -> int:
    return benchlib.run_in_workdir(measure, parse_args(argv), prefix="bench-scaling-")


def measure(args, workdir: Path, load_before: list[float]) -> int:
    prepared = prepare(args, workdir)
    # CPU: workers of 1 CPU each; GPU: 1 GPU each, with half the CPUs (at most 8) each.
    cpus_per_worker = max(1, min(8, args.cpus // 2)) if args.gpu else 1
    runs = OurRuns(args, prepared, workdir)
    with benchlib.local_ray(max(args.cpus, 2)):  # at least 2 for a 2-worker run
        rows = [runs.fit(f"scaling-{workers}", f"scaling: {workers} worker(s) of 1 {'GPU' if args.gpu else 'CPU'}",
                         num_workers=workers, cpus_per_worker=cpus_per_worker) for workers in (1, 2)]
    one, two = rows
    ratios = {"scaling_efficiency_2_workers": benchlib.ratio(two["features_per_s_per_worker"], one["features_per_s_per_worker"]),
              "scaling_speedup_2_workers": benchlib.ratio(two["features_per_s"], one["features_per_s"])}
    benchlib.print_table("Ratios", [{"ratio": name, "value": value} for name, value in ratios.items()], ["ratio", "value"])
    benchlib.print_table("Training throughput (features/s, excluding start-up)", rows,
                         ["recipe", "workers", "features_per_s", "features_per_s_per_worker", "step_s", "load_average"])
    benchlib.write_json(args.out, "train_scaling", ratios, {"scaling": rows}, settings_of(args, prepared), load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
