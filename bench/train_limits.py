"""Where a training step's time and memory go, and how near the machine's own matmul rate the loop runs.

    python -m bench.train_limits                       # the squad-minilm preset's windows (../shared SQuAD)
    python -m bench.train_limits --steps 400 --variants before,now

In one run, on the preset's own windows (SQuAD train questions with the preset's synthesised
negatives, 256-token windows, batches of 16, length-grouped as the loop groups them, bf16 autocast
where the CPU has it):

1. **Profile** of the step (``train_job.optim.train_step``, torch.profiler) at the windows' median
   length, its CPU time by kind: matmuls, fused attention, dropout's random numbers, the optimiser,
   other element-wise work.
2. **Variants** of the loop, each in a fresh process (the allocator's state and its environment are per
   process) and in a thread of its own, as Ray Train runs it: ``--steps`` steps of the real step over
   the same batches in the same order; windows/s per tenth of the run and resident memory per tenth and
   at its peak. ``before``: the loop the issue measured (batches cut to their longest window, a new
   shape nearly every step; PyTorch's dropout; glibc's default thresholds; AdamW a loop over the
   parameters); the others keep freed memory as every CPU worker now does (``train_job.allocator``) and
   fuse AdamW as the loop now does: ``buckets``: batches cut to the loop's multiple of tokens
   (``train_job.loop.TRAIN_LENGTH_MULTIPLE``; 32 before 2026-12-07); ``now``: that
   and ``train_job.dropout``'s cheap dropout, as ``--cheap-dropout`` does; ``attention-dropout-0``: that
   and ``--attention-dropout 0``; ``checkpointed``: ``now`` and ``--gradient-checkpointing``;
   ``preset``: ``now`` and the preset's ``--max-batch-tokens``, the step as the preset takes it;
   ``preset-tcmalloc``: that on tcmalloc, as workers run where it is installed (``--allocator``);
   ``preset-tcmalloc-dense-lookup``: that with the word embedding's gradient dense in every backward, as
   before ``train_job.optim.sparse_lookup_gradients`` (``before`` has it dense too);
   ``preset-tcmalloc-32``: ``preset-tcmalloc`` with batches cut to a multiple of 32 tokens. A
   variant named more than once runs again, in the order given (alternate them: ``--variants
   before,preset,before,preset``), and its ratios are over the mean of its runs.
3. **The machine's rate** at the model's own matmuls: every matmul of a training step at the median
   length (forward, and both products of the backward), timed alone in the same dtype; the loop's
   model FLOP/s as a share of it.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bench import benchlib
from bench.preset_step import prepare_features, preset_config, preset_steps, preset_training, step_inputs
from train_job.allocator import TCMALLOC_PACKAGE, tcmalloc_library, worker_runtime_env

DEFAULT_OUT = benchlib.RESULTS / "train_limits.json"


class Variant(NamedTuple):
    length_multiple: int | None  # tokens batches are cut to a multiple of (None: train_job.loop's)
    attention_dropout: float | None  # --attention-dropout (None: the model's)
    cheap_dropout: bool  # --cheap-dropout
    checkpointing: bool  # --gradient-checkpointing
    keep_freed_memory: bool  # train_job.allocator, as every CPU worker now sets it
    preset_parts: bool = False  # the preset's --max-batch-tokens: gradients added up over parts of a batch
    fused_adamw: bool = True  # one AdamW kernel for all parameters, as the loop builds it on a CPU now
    allocator: str = "glibc"  # train_job --allocator: tcmalloc is preloaded into the variant's process
    sparse_lookup: bool = True  # the word embedding's gradient sparse until the update, as the loop takes it on a CPU now


VARIANTS = {
    # The loop the issue measured: a new shape nearly every step, AdamW a loop over the parameters.
    "before": Variant(1, None, False, False, False, fused_adamw=False, sparse_lookup=False),
    "buckets": Variant(None, None, False, False, True),  # batches cut to TRAIN_LENGTH_MULTIPLE, PyTorch's dropout
    "now": Variant(None, None, True, False, True),  # buckets and --cheap-dropout (train_job.dropout)
    "attention-dropout-0": Variant(None, 0.0, True, False, True),  # and --attention-dropout 0: fused attention
    "checkpointed": Variant(None, None, True, True, True),  # "now" and --gradient-checkpointing
    "preset": Variant(None, None, True, False, True, preset_parts=True),  # "now" and the preset's --max-batch-tokens: as it trains
    # the preset's step on tcmalloc, as its workers run where the library is installed (--allocator auto)
    "preset-tcmalloc": Variant(None, None, True, False, True, preset_parts=True, allocator="tcmalloc"),
    # that with batches cut to a multiple of 32 tokens (serving's), as the loop cut them before
    "preset-tcmalloc-32": Variant(32, None, True, False, True, preset_parts=True, allocator="tcmalloc"),
    # that with a dense word-embedding gradient in every part's backward: the preset's step before the sparse one
    "preset-tcmalloc-dense-lookup": Variant(None, None, True, False, True, preset_parts=True, allocator="tcmalloc",
                                            sparse_lookup=False),
}
PROFILED = {"buckets": (None, False), "now": (None, True), "attention-dropout-0": (0.0, True)}
KINDS = {  # profiler op name prefixes -> kind
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "fused attention": ("aten::_scaled_dot_product_flash_attention",),
    "dropout random numbers": ("aten::bernoulli", "aten::native_dropout", "aten::random_"),
    "optimiser": ("aten::_fused_adamw", "aten::_foreach", "aten::addcdiv", "aten::lerp", "aten::sqrt", "aten::addcmul"),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.train_limits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None,
                        help=f"SQuAD training file (default: {benchlib.data_label(benchlib.SQUAD_FULL_TRAIN)}, "
                             "else the quickstart questions)")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2", help="model (default: %(default)s)")
    parser.add_argument("--questions", type=int, default=3000, help="training questions sampled (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=300, help="steps per variant (default: %(default)s)")
    runnable = [name for name, variant in VARIANTS.items() if variant.allocator != "tcmalloc" or tcmalloc_library()]
    parser.add_argument("--variants", default=",".join(runnable),
                        help="comma-separated, of: " + ", ".join(VARIANTS) + " (default: those this machine can run)")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps profiled (0: no profile; default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file (default: %(default)s)")
    parser.add_argument("--run-variant", default=None, help=argparse.SUPPRESS)  # internal: one variant, in a child
    parser.add_argument("--features", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown --variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if any(VARIANTS[name].allocator == "tcmalloc" for name in args.variants) and not tcmalloc_library():
        parser.error(f"--variants preset-tcmalloc needs tcmalloc (Debian/Ubuntu: apt-get install {TCMALLOC_PACKAGE}); "
                     "or leave it out")
    return args


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_variant(args) -> dict:
    """One variant's run, in this (fresh) process and in a thread of its own, as Ray Train runs the loop
    (a thread's malloc arena is not the main one's): windows/s and resident memory per tenth."""
    import resource

    import torch

    from train_job.allocator import active_allocator, keep_freed_memory
    from train_job.optim import resolve_precision

    variant = VARIANTS[args.run_variant]
    if active_allocator() != variant.allocator:
        raise SystemExit(f"variant {args.run_variant} runs on {variant.allocator}, "
                         f"this process on {active_allocator()}")
    if variant.keep_freed_memory and variant.allocator == "glibc":
        keep_freed_memory()
    steps = preset_steps(args.model, dict(np.load(args.features)), args.steps, length_multiple=variant.length_multiple,
                         attention_dropout=variant.attention_dropout, cheap_dropout=variant.cheap_dropout,
                         gradient_checkpointing=variant.checkpointing,
                         max_tokens=preset_config().max_batch_tokens if variant.preset_parts else None,
                         fused_adamw=variant.fused_adamw, sparse_lookup=variant.sparse_lookup)
    tenth, tenths, losses = max(1, args.steps // 10), [], []
    rss_start = resident_mib()

    def take_steps():
        started, windows, tokens = time.perf_counter(), 0, 0
        for step, done in enumerate(steps, 1):
            losses.append(done["loss"])
            windows += done["windows"]
            tokens += done["padded_tokens"]
            if step % tenth == 0:
                seconds = time.perf_counter() - started
                tenths.append({"windows_per_s": windows / seconds, "padded_tokens": tokens, "seconds": seconds,
                               "resident_mib": resident_mib()})
                started, windows, tokens = time.perf_counter(), 0, 0

    in_a_thread(take_steps)
    return {"variant": args.run_variant, "allocator": active_allocator(),
            "precision": resolve_precision(preset_config().precision, torch.device("cpu")),
            "steps": args.steps, "tenths": tenths,
            "resident_mib_before_steps": rss_start, "peak_resident_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loss_first_tenth": float(np.mean(losses[:tenth])), "loss_last_tenth": float(np.mean(losses[-tenth:])),
            "losses": losses}


def in_a_thread(function) -> None:
    """Run ``function`` in a new thread and wait for it; its exception is raised here."""
    failed = []

    def target():
        try:
            function()
        except BaseException as error:  # re-raised in the caller's thread
            failed.append(error)

    thread = threading.Thread(target=target, name="train-loop")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


def profile_step(args, length: int, variant: str) -> dict:
    """CPU time of ``--profile-steps`` steps at ``length`` tokens by kind of op (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    batch_size = preset_config().per_device_batch_size
    attention_dropout, cheap_dropout = PROFILED[variant]
    model, train = preset_training(args.model, 1000, attention_dropout=attention_dropout, cheap_dropout=cheap_dropout)
    step = lambda: train(step_inputs(model, length, batch_size))
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        started = time.perf_counter()
        for _ in range(args.profile_steps):
            step()
        seconds = (time.perf_counter() - started) / args.profile_steps
    by_kind = dict.fromkeys([*KINDS, "other"], 0.0)
    for event in profiler.key_averages():
        kind = next((k for k, prefixes in KINDS.items() if event.key.startswith(prefixes)), "other")
        by_kind[kind] += event.self_cpu_time_total / 1e6 / args.profile_steps
    total = sum(by_kind.values())
    return {"length": length, "variant": variant, "step_s": seconds, "windows_per_s": batch_size / seconds,
            "share_of_cpu_time": {kind: value / total for kind, value in by_kind.items()}}


def matmul_rate(args, length: int) -> dict:
    """GFLOP/s of every matmul of one training step at ``length`` tokens, each timed alone (bf16 where the
    step computes in bf16): the linear layers' forward and both backward products, and attention's two
    batched products forward and backward."""
    import torch

    from transformers import AutoConfig

    from qa_common import resolve_model_path
    from train_job.optim import resolve_precision

    model_config = AutoConfig.from_pretrained(resolve_model_path(args.model))
    config = preset_config()
    precision = resolve_precision(config.precision, torch.device("cpu"))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    hidden, inner, layers = model_config.hidden_size, model_config.intermediate_size, model_config.num_hidden_layers
    heads = model_config.num_attention_heads
    tokens, batch = config.per_device_batch_size * length, config.per_device_batch_size
    linear = [(tokens, hidden, hidden)] * 4 + [(tokens, hidden, inner), (tokens, inner, hidden)]  # (T, in, out) per layer
    products = []  # (a shape, b shape) of every mm of one layer's forward + backward
    for t, fan_in, fan_out in linear:
        products += [((t, fan_in), (fan_in, fan_out)), ((t, fan_out), (fan_out, fan_in)), ((fan_in, t), (t, fan_out))]
    head_dim = hidden // heads
    attention = [((batch * heads, length, head_dim), (batch * heads, head_dim, length)),
                 ((batch * heads, length, length), (batch * heads, length, head_dim))]
    products += attention * 3  # forward, and the two products of each backward, have these FLOPs
    flops, seconds = 0.0, 0.0
    for a_shape, b_shape in products:
        a, b = torch.randn(a_shape, dtype=dtype), torch.randn(b_shape, dtype=dtype)
        multiply = torch.bmm if len(a_shape) == 3 else torch.mm
        multiply(a, b)
        started, repeats = time.perf_counter(), 5
        for _ in range(repeats):
            multiply(a, b)
        seconds += (time.perf_counter() - started) / repeats
        flops += 2 * np.prod(a_shape) * b_shape[-1]
    return {"length": length, "dtype": str(dtype).removeprefix("torch."), "gflop_per_step": flops * layers / 1e9,
            "gflop_per_s": flops / seconds / 1e9, "matmul_s_per_step": seconds * layers}


def model_gflop_per_window(args, padded_tokens_per_window: float, length: float) -> float:
    """Training FLOPs per window of the encoder's matmuls (6 per weight per token, and attention's 12·L·H)."""
    from transformers import AutoConfig

    from qa_common import resolve_model_path

    model_config = AutoConfig.from_pretrained(resolve_model_path(args.model))
    hidden, inner = model_config.hidden_size, model_config.intermediate_size
    per_token = model_config.num_hidden_layers * (6 * (4 * hidden * hidden + 2 * hidden * inner) + 12 * length * hidden)
    return per_token * padded_tokens_per_window / 1e9


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run_variant:
        benchlib.quiet_libraries()
        return benchlib.report_to_parent(run_variant(args))
    return benchlib.run_in_workdir(measure, args, prefix="bench-limits-")


def measure(args, workdir: Path, load_before: list[float]) -> int:
    benchlib.quiet_libraries()
    features_path = workdir / "features.npz"
    data = prepare_features(args, features_path)
    lengths = np.load(features_path)["attention_mask"].sum(axis=1)
    median_length = int(np.median(lengths))
    print(f"{data['windows']} windows of {data['questions']} questions; median length {median_length}", flush=True)
    runs = []
    for variant in args.variants:
        print(f"variant {variant}: {args.steps} steps in a fresh process", flush=True)
        runs.append(benchlib.in_fresh_process("bench.train_limits", "--run-variant", variant, "--features",
                                              str(features_path), "--steps", str(args.steps), "--model", args.model,
                                              env=worker_runtime_env(VARIANTS[variant].allocator).get("env_vars")))
    profiles = [profile_step(args, median_length, variant) for variant in PROFILED] if args.profile_steps else []
    rate = matmul_rate(args, median_length)
    rows = []
    for run in runs:
        tenths = run.pop("tenths")
        settled = tenths[1:]  # the first tenth includes oneDNN's first primitives and the allocator's growth
        windows_per_s = sum(t["seconds"] * t["windows_per_s"] for t in settled) / sum(t["seconds"] for t in settled)
        padded = sum(t["padded_tokens"] for t in settled) / sum(t["seconds"] * t["windows_per_s"] for t in settled)
        loop_gflop_s = windows_per_s * model_gflop_per_window(args, padded, padded)
        rows.append({"variant": run["variant"], "allocator": run["allocator"], "windows_per_s": windows_per_s,
                     "second_tenth_windows_per_s": settled[0]["windows_per_s"],
                     "last_tenth_windows_per_s": settled[-1]["windows_per_s"],
                     "last_vs_second_tenth": settled[-1]["windows_per_s"] / settled[0]["windows_per_s"],
                     "resident_mib_per_tenth": [round(t["resident_mib"]) for t in tenths],
                     "peak_resident_mib": run["peak_resident_mib"], "loop_gflop_per_s": loop_gflop_s,
                     "share_of_matmul_rate": loop_gflop_s / rate["gflop_per_s"],
                     "loss_first_tenth": run["loss_first_tenth"], "loss_last_tenth": run["loss_last_tenth"],
                     "losses": run["losses"]})
    by_name = {name: {key: float(np.mean([row[key] for row in rows if row["variant"] == name]))
                      for key in ("windows_per_s", "peak_resident_mib", "share_of_matmul_rate")}
               for name in dict.fromkeys(args.variants)}  # a variant run more than once: the mean of its runs
    ratios = {}
    for name in [n for n in by_name if n != "before"] if "before" in by_name else ():
        ratios[f"{name}_vs_before_windows_per_s"] = by_name[name]["windows_per_s"] / by_name["before"]["windows_per_s"]
        ratios[f"{name}_vs_before_peak_memory"] = by_name[name]["peak_resident_mib"] / by_name["before"]["peak_resident_mib"]
    ratios.update({f"{name}_share_of_matmul_rate": row["share_of_matmul_rate"] for name, row in by_name.items()})
    benchlib.print_table("Ratios", [{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    benchlib.print_table("The loop, each variant in a fresh process", rows,
                         ["variant", "windows_per_s", "second_tenth_windows_per_s", "last_tenth_windows_per_s",
                          "peak_resident_mib", "loop_gflop_per_s", "share_of_matmul_rate", "loss_last_tenth"])
    benchlib.print_table(f"One step at {median_length} tokens, CPU time by kind",
                         [{"variant": p["variant"], "windows_per_s": p["windows_per_s"],
                           **{k: f"{v:.1%}" for k, v in p["share_of_cpu_time"].items()}} for p in profiles],
                         ["variant", "windows_per_s", *KINDS, "other"])
    print(f"matmul rate at the model's shapes ({rate['dtype']}, {median_length} tokens): {rate['gflop_per_s']:.0f} GFLOP/s")
    benchlib.write_json(args.out, "train_limits", ratios,
                        {"variants": rows, "profiles": profiles, "matmul_rate": rate},
                        {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, **data,
                         "median_length": median_length}, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
