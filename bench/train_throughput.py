"""Training throughput: the seed recipe (HF Trainer) against our Ray Train loop, in one run.

    python -m bench.train_throughput                      # CPU: BERT-mini shape, seq 384, minutes on 2 cores
    python -m bench.train_throughput --scaling            # + 1 vs 2 Ray Train CPU workers
    python -m bench.train_throughput --ablate             # + our loop again with length grouping off, compile flipped
    python -m bench.train_throughput --variants           # + the loop's step in-process, each speed feature on/off
    python -m bench.train_throughput --gpu                # bert-base-cased shape, seq 384, fp16 seed / bf16 ours

Both recipes train the same model (same shape, same initial weights) on the same training windows
(``qa_common.prepare_train_features`` of the same questions):

- seed: Hugging Face ``Trainer`` with the seed notebook's settings: per-device batch 8, fp16 on a GPU
  (fp32 on CPU), every window padded to ``max_length``, Trainer's default optimiser. Throughput is
  measured over the steps after ``--warmup-steps``.
- ours: ``train_job`` as it runs: ``PreparedData`` (Ray Data featurisation) + ``build_trainer`` with one
  Ray Train worker holding all CPUs (or one GPU). Throughput is the loop's own training features/s of
  its last epoch (first epoch shown too); start-up (Ray Train workers, model load) and per-epoch
  evaluation/checkpointing are reported separately as overhead.

Figures are features (windows) per second: both recipes go through the same windows, so the ratio is
one of "feature-equivalents".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from bench import benchlib
from qa_common import QAConfig
from qa_common.config import add_dataclass_flags, given_flags

DEFAULT_OUT = benchlib.RESULTS / "train_throughput.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_throughput", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--gpu", action="store_true",
                        help="GPU mode: bert-base shape, fp16 seed / bf16 ours, larger batch and more data")
    parser.add_argument("--model", help=f"{benchlib.MODEL_HELP} (default: bert-mini on CPU, bert-base with --gpu)")
    parser.add_argument("--data", type=Path, default=None,
                        help="SQuAD-format training questions (default: ../shared SQuAD sample article if present, "
                             "else train_job/quickstart_data/quickstart-train.jsonl)")
    parser.add_argument("--eval-data", type=Path, default=None,
                        help="validation questions for our loop's per-epoch evaluation (default: the matching dev file)")
    parser.add_argument("--eval-questions", type=int, default=16,
                        help="validation questions evaluated per epoch by our loop (its cost counts as overhead)")
    parser.add_argument("--max-train-samples", type=int, default=None, help="use only the first N training questions")
    parser.add_argument("--repeat", type=int, default=None,
                        help="replicate the training questions N times (default 1 on CPU, 30 with --gpu)")
    parser.add_argument("--seed-batch-size", type=int, default=8, help="HF Trainer per-device batch (seed: 8)")
    parser.add_argument("--seed-steps", type=int, default=None,
                        help="timed HF Trainer steps after the warm-up (default 10 on CPU, 60 with --gpu)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed HF Trainer steps first (default: 2)")
    parser.add_argument("--batch-size", type=int, default=None, help="our per-worker batch (default 16 on CPU, 64 with --gpu)")
    parser.add_argument("--epochs", type=int, default=2, help="our epochs; the last one's throughput is the figure")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                        help="our precision (default fp32 on CPU, bf16 with --gpu)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(),
                        help="CPUs of the local Ray and of our single worker (default: all, %(default)s)")
    parser.add_argument("--scaling", action="store_true",
                        help="also train with 1 and with 2 Ray Train workers of 1 CPU each (GPU each with --gpu)")
    parser.add_argument("--variants", action="store_true",
                        help="also time the loop's step in-process with each speed feature on and off")
    parser.add_argument("--variant-features", type=int, default=128, help="features per variant timing (default: %(default)s)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="our loop's --compile (torch.compile; default: on with --gpu, off on CPU)")
    parser.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                        help="our loop without length-grouped batches (its default groups them)")
    parser.add_argument("--ablate", action="store_true",
                        help="also run our loop with length grouping off (and compile flipped), one Ray Train run each")
    parser.add_argument("--variant-repeats", type=int, default=1,
                        help="rounds over the variants, the best of each kept (default: %(default)s)")
    parser.add_argument("--variant-compile", action="store_true",
                        help="include torch.compile among the in-process variants (slow to compile on CPU)")
    parser.add_argument("--skip-compare", action="store_true", help="skip the seed-vs-ours comparison")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file (default: %(default)s)")
    add_dataclass_flags(parser, QAConfig)
    args = parser.parse_args(argv)
    args.qa = QAConfig(**given_flags(args, QAConfig))
    args.model = args.model or ("bert-base" if args.gpu else "bert-mini")
    args.data = args.data or benchlib.default_train_data()
    if args.eval_data is None:
        args.eval_data = (benchlib.QUICKSTART_VALIDATION if args.data == benchlib.QUICKSTART_TRAIN
                          else benchlib.default_eval_data())
    args.repeat = args.repeat or (30 if args.gpu else 1)
    args.seed_steps = args.seed_steps or (60 if args.gpu else 10)
    args.batch_size = args.batch_size or (64 if args.gpu else 16)
    args.precision = args.precision or ("bf16" if args.gpu else "fp32")
    args.compile = args.gpu if args.compile is None else args.compile
    if args.warmup_steps < 1:
        parser.error("--warmup-steps must be at least 1 (the first step is never timed)")
    return args


# --- data ---------------------------------------------------------------------------------------


def training_records(args) -> list[dict]:
    from qa_common import read_squad

    records = read_squad(args.data)[: args.max_train_samples]
    if args.repeat > 1:
        records = [{**r, "id": f"{r['id']}#{copy_index}"} for copy_index in range(args.repeat) for r in records]
    return records


def training_features(records, tokenizer, qa_config) -> dict:
    from qa_common import prepare_train_features

    return prepare_train_features(
        [r["question"] for r in records], [r["context"] for r in records],
        [r["answers"]["answer_start"][0] for r in records], [r["answers"]["text"][0] for r in records],
        tokenizer, qa_config,
    )


# --- the seed recipe: HF Trainer ------------------------------------------------------------------


def run_seed(args, model_dir: str, features: dict, workdir: Path) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForQuestionAnswering, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from qa_common import load_tokenizer

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, arguments, state, control, **kwargs):
            if torch.cuda.is_available() and args.gpu:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    clock = benchlib.Stopwatch()
    dataset = datasets.Dataset.from_dict({name: values.tolist() for name, values in features.items()})
    dataset.set_format("torch")
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir)
    training_args = TrainingArguments(
        output_dir=str(workdir / "hf-trainer"),
        per_device_train_batch_size=args.seed_batch_size,
        learning_rate=2e-5, weight_decay=0.01, num_train_epochs=1,
        max_steps=args.warmup_steps + args.seed_steps,
        fp16=args.gpu, use_cpu=not args.gpu,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none",
        disable_tqdm=True, seed=42,
    )
    timer = StepTimes()
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, processing_class=load_tokenizer(model_dir),
                      data_collator=default_data_collator, callbacks=[timer])
    setup_s = clock()
    output = trainer.train()
    timed = timer.ends[args.warmup_steps - 1 :]
    steady_s = timed[-1] - timed[0]
    timed_steps = len(timed) - 1
    return {
        "recipe": "seed: HF Trainer",
        "precision": "fp16" if args.gpu else "fp32",
        "batch_size": args.seed_batch_size,
        "padding": f"every window to {args.qa.max_length}",
        "optimizer": training_args.optim.value if hasattr(training_args.optim, "value") else str(training_args.optim),
        "timed_steps": timed_steps,
        "features_per_s": timed_steps * args.seed_batch_size / steady_s,
        "step_s": steady_s / timed_steps,
        "hf_reported_samples_per_s": output.metrics.get("train_samples_per_second"),
        "setup_s": setup_s,
        "train_call_s": output.metrics.get("train_runtime"),
    }


# --- ours: train_job with Ray Train ---------------------------------------------------------------


def train_config(args, model_dir: str, workdir: Path, train_file: Path, label: str, **overrides):
    """Our run's TrainConfig: the bench's settings, then ``overrides`` (num_workers, group_by_length, ...)."""
    from train_job.config import TrainConfig

    values = dict(
        model=model_dir, train_file=str(train_file), validation_file=str(args.eval_data),
        output_dir=str(workdir / label), num_workers=1, use_gpu=args.gpu,
        cpus_per_worker=min(8, args.cpus) if args.gpu else args.cpus, epochs=args.epochs,
        per_device_batch_size=args.batch_size, precision=args.precision, qa=args.qa, max_eval_samples=args.eval_questions,
        max_failures=0, checkpoints_to_keep=1, warmup_ratio=0.0, group_by_length=args.group_by_length,
        compile=args.compile,
    )
    values.update(overrides)
    return TrainConfig(**values).validate()


def run_ours(config, label: str, data=None) -> dict:
    """Fit ``config`` with Ray Train; features/s of the last epoch and the overhead around it."""
    from train_job.data import load_splits
    from train_job.driver import PreparedData, build_trainer, epoch_history

    clock = benchlib.Stopwatch()
    data = data or PreparedData(config, *load_splits(config))
    prepare_s = clock()
    trainer = build_trainer(config, data, name=f"bench-{label}", storage_path=str(Path(config.output_dir) / "checkpoints"))
    clock = benchlib.Stopwatch()
    result = trainer.fit()
    fit_s = clock()
    history = epoch_history(result)
    epoch_times = [history[0]["train_runtime_s"]] + [
        later["train_runtime_s"] - earlier["train_runtime_s"] for earlier, later in zip(history, history[1:])
    ]
    per_epoch = [h["train_samples_per_second"] for h in history]
    steps = math.ceil(math.ceil(data.train_feature_count / config.num_workers) / config.per_device_batch_size)
    return {
        "recipe": label,
        "precision": config.precision,
        "batch_size": config.per_device_batch_size,
        "workers": config.num_workers,
        "cpus_per_worker": None if config.use_gpu else config.cpus_per_worker,
        "group_by_length": config.group_by_length,
        "compile": config.compile,
        "padding": "trimmed per batch" + (", length-grouped" if config.group_by_length else ""),
        "train_features": data.train_feature_count,
        "features_per_s": per_epoch[-1],
        "features_per_s_per_worker": per_epoch[-1] / config.num_workers,
        "features_per_s_by_epoch": per_epoch,
        "step_s": epoch_times[-1] / steps,
        "prepare_s": prepare_s,
        "fit_s": fit_s,
        "train_s": sum(epoch_times),
        "overhead_s": fit_s - sum(epoch_times),
        "overhead_note": f"Ray Train start-up, model load, evaluation of {config.max_eval_samples} questions "
                         f"and a checkpoint, per epoch",
        "data": data,
    }


# --- variants: the loop's step in-process -------------------------------------------------------------


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
    fused_default = args.gpu  # the loop's current choice
    plans = [
        ("pad every window to max_length", dict(batching="random", trim=False)),
        ("trim per batch, random batches (--no-group-by-length)", dict(batching="random", trim=True)),
        ("length-grouped + trim (loop default)", dict(batching="grouped", trim=True)),
        ("length-grouped + trim, eager attention", dict(batching="grouped", trim=True, attention="eager")),
        ("length-grouped + trim, fused AdamW" if not args.gpu else "length-grouped + trim, unfused AdamW",
         dict(batching="grouped", trim=True, fused=not fused_default)),
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
                            attention=plan.get("attention", "sdpa"), fused=plan.get("fused", fused_default),
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


# --- main -------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    return benchlib.run_in_workdir(measure, parse_args(argv), prefix="bench-train-")


def measure(args, workdir: Path, load_before: list[float]) -> int:
    from qa_common import load_tokenizer, read_squad

    model_dir = benchlib.prepare_model_dir(args.model, workdir / "model")
    records = training_records(args)
    train_file = workdir / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    read_squad(args.eval_data)  # fail early on a bad file
    features = training_features(records, load_tokenizer(model_dir), args.qa)
    lengths = features["attention_mask"].sum(axis=1)
    print(f"[bench] {len(records)} training questions -> {len(lengths)} windows of {args.qa.max_length} tokens, "
          f"mean real length {lengths.mean():.0f}; model {benchlib.model_summary(model_dir)}", flush=True)

    results, ratios, rows = {}, {}, []

    def record(key, row):
        row = {**row, "load_average": row.get("load_average") or benchlib.load_average()}
        row = {name: value for name, value in row.items() if name != "data"}
        rows.append(row)
        if key in ("scaling", "ablation"):  # lists of runs
            results.setdefault(key, []).append(row)
        else:
            results[key] = row
        return row

    prepared = {}  # Ray Data featurisation, done once: every run trains on the same windows

    def fit(label: str, title: str, **overrides) -> dict:
        import ray

        if not ray.is_initialized():
            benchlib.init_local_ray(max(args.cpus, 2))  # at least 2 for the 2-worker scaling run
        print(f"[bench] {title} ...", flush=True)
        run = run_ours(train_config(args, model_dir, workdir, train_file, label, **overrides), title,
                       data=prepared.get("data"))
        prepared["data"] = run["data"]
        return run

    ours = None
    if not args.skip_compare:
        print("[bench] seed recipe: HF Trainer ...", flush=True)
        seed = record("seed", run_seed(args, model_dir, features, workdir))
        ours = record("ours", fit("ours", "ours: train_job (Ray Train)"))
        ratios["ours_vs_seed_features_per_s"] = benchlib.ratio(ours["features_per_s"], seed["features_per_s"])
        if args.ablate:
            for name, value in (("group_by_length", not ours["group_by_length"]), ("compile", not ours["compile"])):
                row = record("ablation", fit(f"ablate-{name}", f"ours, {name}={value}", **{name: value}))
                ratios[f"ours_default_vs_{name}_{value}"] = benchlib.ratio(ours["features_per_s"], row["features_per_s"])
    if args.scaling:
        # CPU: workers of 1 CPU each; GPU: 1 GPU each, with half the CPUs (at most 8) each.
        cpus_per_worker = max(1, min(8, args.cpus // 2)) if args.gpu else 1
        for workers in (1, 2):
            title = f"scaling: {workers} worker(s) of 1 {'GPU' if args.gpu else 'CPU'}"
            if workers == 1 and ours and not args.gpu and args.cpus == 1:  # the very run "ours" made
                record("scaling", {**ours, "recipe": title})
                continue
            record("scaling", fit(f"scaling-{workers}", title, num_workers=workers, cpus_per_worker=cpus_per_worker))
        one, two = results["scaling"]
        ratios["scaling_efficiency_2_workers"] = benchlib.ratio(two["features_per_s_per_worker"], one["features_per_s_per_worker"])
        ratios["scaling_speedup_2_workers"] = benchlib.ratio(two["features_per_s"], one["features_per_s"])
    import ray

    if ray.is_initialized():
        ray.shutdown()
    if args.variants:
        results["variants"] = run_variants(args, model_dir, features)
        for row in results["variants"]:
            ratios[f"variant: {row['variant']} vs loop default"] = row["vs_loop_default"]

    print_report(ratios, rows, results.get("variants"))
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    settings.update(data=benchlib.data_label(args.data), eval_data=benchlib.data_label(args.eval_data),
                    model_shape=benchlib.model_summary(model_dir), train_questions=len(records),
                    train_features=int(len(lengths)), mean_window_tokens=float(lengths.mean()))
    settings.pop("out")
    benchlib.write_json(args.out, "train_throughput", ratios, results, settings, load_before)
    return 0


def print_report(ratios: dict, rows: list[dict], variants: list[dict] | None) -> None:
    benchlib.print_table("Ratios", [{"ratio": name, "value": value} for name, value in ratios.items()], ["ratio", "value"])
    if rows:
        benchlib.print_table("Training throughput (features/s, excluding start-up)", rows,
                             ["recipe", "precision", "batch_size", "workers", "features_per_s", "features_per_s_per_worker",
                              "step_s", "overhead_s", "load_average"])
    if variants:
        benchlib.print_table("The loop's step in-process, one speed feature at a time", variants,
                             ["variant", "precision", "attention", "fused", "features_per_s", "padded_tokens_per_feature",
                              "vs_loop_default", "warmup_s", "load_average"])


if __name__ == "__main__":
    sys.exit(main())
