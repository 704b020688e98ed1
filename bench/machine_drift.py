"""Whether the machine keeps its own speed under sustained load: the same work, timed round after round.

    python -m bench.machine_drift                                   # the preset's model, 15 minutes
    python -m bench.machine_drift --model runs/squad-minilm/model --minutes 5

A training run's rate by tenth of its epoch (``bench.ray_overhead``) mixes three things: the step,
the windows it is given and the machine. This takes the first two out. One process does the same
work again and again: the preset's forward and backward (its autocast and ``--max-batch-tokens``
parts, as ``bench.preset_step`` builds them) over ``--steps-per-round`` fixed batches of random
windows, ``--length`` tokens each. There is no update, so the weights stay those of ``--model``.
It times that work in rounds for ``--minutes``.

Start it on a machine that has been idle for a few minutes. Then a fall in the rate is the machine
(a clock that boosts and settles, neighbours on a shared host), not the code. Run it again with a
trained model's directory: the same time says that what the weights have learned (subnormal values,
say) does not change the step's cost, at least on these random windows.

Reported: each round's median step and when it started; the median step of the first
``--opening-minutes`` against that of the rest; a PNG of the rounds beside the JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from bench import benchlib
from bench.preset_step import preset_autocast, preset_config, step_inputs

DEFAULT_OUT = benchlib.RESULTS / "machine_drift.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.machine_drift", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub name or model directory (default: the squad-minilm preset's)")
    parser.add_argument("--minutes", type=float, default=15.0, help="how long to repeat the work (default: %(default)s)")
    parser.add_argument("--opening-minutes", type=float, default=3.0,
                        help="the first stretch, compared with the rest (default: %(default)s)")
    parser.add_argument("--steps-per-round", type=int, default=10, help="fixed batches in a round (default: %(default)s)")
    parser.add_argument("--length", type=int, default=256, help="tokens per window (default: %(default)s, the preset's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.steps_per_round < 1 or args.length < 8:
        parser.error("--minutes must be > 0, --steps-per-round >= 1, --length >= 8")
    return args


def fixed_work(model_name: str, length: int, batches: int):
    """``work()``: the preset's forward and backward over the same ``batches`` batches, returning each
    one's seconds; the model's gradients are dropped after each, so every call does the same work."""
    import torch

    from qa_common import load_model_and_tokenizer
    from train_job.dropout import use_cheap_dropout
    from train_job.loss import micro_batches, model_loss

    config = preset_config()
    torch.set_num_threads(os.cpu_count())
    model, _ = load_model_and_tokenizer(model_name, dtype=torch.float32)
    if config.cheap_dropout:
        use_cheap_dropout(model)
    model.train()
    autocast = preset_autocast()
    inputs = [step_inputs(model, length, config.per_device_batch_size, seed=seed) for seed in range(batches)]

    def work() -> list[float]:
        seconds = []
        for batch in inputs:
            started = time.perf_counter()
            for part, share in micro_batches(batch, config.max_batch_tokens):
                with autocast:
                    loss = model_loss(model, part) * share
                loss.backward()
            model.zero_grad(set_to_none=True)
            seconds.append(time.perf_counter() - started)
        return seconds

    return work


def plot_rounds(rounds: list[dict], opening_minutes: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 3.5))
    axes.plot([r["started_s"] / 60 for r in rounds], [r["median_step_ms"] for r in rounds], marker=".")
    axes.axvline(opening_minutes, color="tab:gray", linestyle=":", label=f"first {opening_minutes:g} min")
    axes.set_xlabel("minutes since the first round")
    axes.set_ylabel("median step (ms)")
    axes.set_title(title, fontsize=9)
    axes.legend()
    benchlib.save_figure(figure, path)
    plt.close(figure)


def main(argv=None) -> int:
    return benchlib.run_in_workdir(measure, parse_args(argv), prefix="bench-machine-drift-")


def measure(args, workdir: Path, load_before: list[float]) -> int:
    config = preset_config()
    model_name = args.model or config.model
    work = fixed_work(model_name, args.length, args.steps_per_round)
    work()  # oneDNN's primitives and the allocator's first blocks: not the machine's speed
    rounds, first = [], time.perf_counter()
    while time.perf_counter() - first < args.minutes * 60:
        started = time.perf_counter() - first
        rounds.append({"round": len(rounds), "started_s": started,
                       "median_step_ms": 1000 * statistics.median(work())})
    opening = [r["median_step_ms"] for r in rounds if r["started_s"] < args.opening_minutes * 60]
    rest = [r["median_step_ms"] for r in rounds if r["started_s"] >= args.opening_minutes * 60]
    steps = [r["median_step_ms"] for r in rounds]
    ratios = {"rest_vs_opening_step_time": benchlib.ratio(benchlib.median(rest), benchlib.median(opening)),
              "slowest_vs_fastest_round": benchlib.ratio(max(steps), min(steps))}
    benchlib.print_table("Ratios", [{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    benchlib.print_table("Rounds", rounds, ["round", "started_s", "median_step_ms"])
    plot_rounds(rounds, args.opening_minutes, args.out.with_suffix(".png"),
                f"The same forward and backward, {args.length} tokens x {config.per_device_batch_size}, "
                f"round after round")
    benchlib.write_json(args.out, "machine_drift", ratios, {"rounds": rounds},
                        {"model": model_name, "minutes": args.minutes, "opening_minutes": args.opening_minutes,
                         "steps_per_round": args.steps_per_round, "length": args.length}, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
