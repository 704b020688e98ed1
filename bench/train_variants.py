"""What each speed feature of the training loop gives: its step (``train_job.optim.train_step``) timed
in-process over the same windows, one feature at a time on and off.

    python -m bench.train_variants --variant-repeats 3 --variant-compile

Padding to ``max_length`` vs trimming per batch, random vs length-grouped batches, eager vs SDPA
attention, fused vs unfused AdamW, bf16 autocast vs fp32, torch.compile. Rounds run round-robin and
the best of each is kept: on a shared machine the best run is the least disturbed one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import benchlib
from bench.train_recipes import add_common_flags, finish_common_flags, prepare, settings_of

DEFAULT_OUT = benchlib.RESULTS / "train_variants.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.train_variants", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser)
    parser.add_argument("--variant-features", type=int, default=128, help="features per variant timing (default: %(default)s)")
    parser.add_argument("--variant-repeats", type=int, default=1,
                        help="rounds over the variants, the best of each kept (default: %(default)s)")
    parser.add_argument("--variant-compile", action="store_true",
                        help="include torch.compile among the variants (slow to compile on CPU)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file (default: %(default)s)")
    return finish_common_flags(parser.parse_args(argv))


def main(argv=None) -> int:
    return benchlib.run_in_workdir(measure, parse_args(argv), prefix="bench-variants-")


def measure(args, workdir: Path, load_before: list[float]) -> int:
    prepared = prepare(args, workdir)
    rows = run_variants(args, prepared["model_dir"], prepared["features"])
    ratios = {f"variant: {row['variant']} vs loop default": row["vs_loop_default"] for row in rows}
    benchlib.print_table("Ratios", [{"ratio": name, "value": value} for name, value in ratios.items()], ["ratio", "value"])
    benchlib.print_table("The loop's step in-process, one speed feature at a time", rows,
                         ["variant", "precision", "attention", "fused", "features_per_s", "padded_tokens_per_feature",
                          "vs_loop_default", "warmup_s", "load_average"])
    benchlib.write_json(args.out, "train_variants", ratios, {"variants": rows}, settings_of(args, prepared), load_before)
    return 0


def grouped_batches(features: dict, batch_size: int, rng) -> list[dict]:
    """Length-grouped batches as the loop makes them: shuffled, cut into groups of ``GROUP_BATCHES``
    batches, each group sorted by length and re-cut (``qa_common.length_grouped_batches``)."""
    from qa_common import length_grouped_batches
    from train_job.loop import GROUP_BATCHES

    count = len(features["input_ids"])
    order = rng.permutation(count)
    group = GROUP_BATCHES * batch_size
    big = ({name: values[order[i : i + group]] for name, values in features.items()} for i in range(0, count, group))
    return list(length_grouped_batches(big, batch_size, rng))


def random_batches(features: dict, batch_size: int, rng) -> list[dict]:
    count = len(features["input_ids"])
    order = rng.permutation(count)
    return [{name: values[order[i : i + batch_size]] for name, values in features.items()} for i in range(0, count, batch_size)]


def time_variant(model_dir: str, batches: list[dict], warmup: list[dict], *, device, precision: str, trim: bool,
                 attention: str, fused: bool, compile_model: str | None) -> dict:
    """Run the loop's step (``train_job.optim.train_step``) over ``batches``; features/s."""
    import torch
    from transformers import AutoModelForQuestionAnswering

    from qa_common import trim_padding
    from train_job.loop import AUTOCAST_DTYPES
    from train_job.optim import build_optimizer, build_scheduler, train_step

    torch.manual_seed(0)
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir, attn_implementation=attention).to(device).train()
    optimizer = build_optimizer(model, learning_rate=1e-4, weight_decay=0.01, fused=fused)
    total_steps = len(warmup) + len(batches)
    scheduler = build_scheduler(optimizer, warmup_steps=0, total_steps=total_steps + 1)
    dtype = AUTOCAST_DTYPES.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    # "auto": torch.compile's defaults (a dimension seen changing is recompiled as dynamic); "dynamic": dynamic=True
    forward = model
    if compile_model:
        forward = torch.compile(model, dynamic=True if compile_model == "dynamic" else None)

    def step(batch):
        batch = trim_padding(batch) if trim else batch
        inputs = {name: torch.as_tensor(values, dtype=torch.long).to(device, non_blocking=True) for name, values in batch.items()}
        return train_step(forward, inputs, optimizer=optimizer, scheduler=scheduler, scaler=scaler, autocast=autocast)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    clock = benchlib.Stopwatch()
    for batch in warmup:
        step(batch)
    synchronize()
    warmup_s = clock()
    clock = benchlib.Stopwatch()
    tokens = 0
    for batch in batches:
        loss = step(batch)
        tokens += (trim_padding(batch) if trim else batch)["input_ids"].size
    loss.item()
    synchronize()
    seconds = clock()
    features = sum(len(batch["input_ids"]) for batch in batches)
    return {"features": features, "seconds": seconds, "features_per_s": features / seconds,
            "padded_tokens_per_feature": tokens / features, "warmup_s": warmup_s}


def run_variants(args, model_dir: str, features: dict) -> list[dict]:
    import numpy as np
    import torch

    device = torch.device("cuda" if args.gpu else "cpu")
    rng = np.random.default_rng(0)
    count = len(features["input_ids"])
    if count < 2:
        raise SystemExit("--variants needs at least 2 training features")
    chosen = rng.permutation(count)
    timed_rows = chosen[: min(args.variant_features, count - 1)]
    warm_rows = chosen[len(timed_rows) :][: 2 * args.batch_size]
    timed = {name: values[timed_rows] for name, values in features.items()}
    warm = {name: values[warm_rows] for name, values in features.items()}
    batch = args.batch_size
    base = "bf16" if args.gpu else "fp32"
    plans = [
        ("pad every window to max_length", dict(batching="random", trim=False)),
        ("trim per batch, random batches (--no-group-by-length)", dict(batching="random", trim=True)),
        ("length-grouped + trim (loop default)", dict(batching="grouped", trim=True)),
        ("length-grouped + trim, eager attention", dict(batching="grouped", trim=True, attention="eager")),
        ("length-grouped + trim, unfused AdamW", dict(batching="grouped", trim=True, fused=False)),
        ("length-grouped + trim, bf16 autocast" if not args.gpu else "length-grouped + trim, fp32",
         dict(batching="grouped", trim=True, precision="fp32" if args.gpu else "bf16")),
    ]
    if args.variant_compile:
        plans.append(("length-grouped + trim, torch.compile", dict(batching="grouped", trim=True, compile_model="auto")))
        plans.append(("length-grouped + trim, torch.compile(dynamic=True)",
                      dict(batching="grouped", trim=True, compile_model="dynamic")))
    # Round-robin repeats, best of them kept: on a shared machine the best run is the least disturbed one.
    # torch.compile variants run once (their warm-up compiles for minutes on a small CPU).
    runs = {name: [] for name, _ in plans}
    for repeat in range(args.variant_repeats):
        for name, plan in plans:
            if repeat and plan.get("compile_model"):
                continue
            make = (lambda f: grouped_batches(f, batch, np.random.default_rng(1))) if plan["batching"] == "grouped" \
                else (lambda f: random_batches(f, batch, np.random.default_rng(1)))
            settings = dict(precision=plan.get("precision", base), trim=plan["trim"],
                            attention=plan.get("attention", "sdpa"), fused=plan.get("fused", True),
                            compile_model=plan.get("compile_model"))
            load = benchlib.load_average()
            print(f"[bench] variant (round {repeat + 1}): {name} ...", flush=True)
            result = time_variant(model_dir, make(timed), make(warm), device=device, **settings)
            runs[name].append({"variant": name, **settings, "batch_size": batch, **result, "load_average": load})
    rows = []
    for name, _ in plans:
        best = max(runs[name], key=lambda run: run["features_per_s"])
        rows.append({**best, "rounds": len(runs[name]),
                     "features_per_s_all_rounds": [run["features_per_s"] for run in runs[name]]})
    reference = rows[2]["features_per_s"]  # the loop's defaults
    for row in rows:
        row["vs_loop_default"] = benchlib.ratio(row["features_per_s"], reference)
    return rows


if __name__ == "__main__":
    sys.exit(main())
