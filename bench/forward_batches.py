"""Forward batches on a CPU: 64 windows at a time against at most ``CPU_BATCH_TOKENS`` tokens.

    python -m qa_common.export_onnx MODEL_DIR --int8     # once, for the onnx-int8 runs
    python -m bench.forward_batches --model MODEL_DIR

``qa_common.predict_logits`` (what validation, serving, batch answering and the library's jobs
run) over the windows of ``--questions`` SQuAD dev questions (the preset's 256-token windows), in
each backend: ``torch`` (float32), ``autocast`` (float32 weights under bf16 autocast, as the
training worker validates) and ``onnx-int8`` (what serving's ``auto`` picks on a CPU). Each run is
a fresh process: ``windows`` caps a batch at 64 windows only (``FORWARD_BATCH_SIZE``, the CPU
default before the token budget), ``tokens`` also at ``CPU_BATCH_TOKENS`` tokens. Reported:
windows/s, the process's resident memory growth over the run (its peak less its size before the
first timed batch), and the EM/F1 of its answers (int8's activation scales are per batch, so its
answers move with the batches; the others' only by float rounding).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from bench import benchlib

DEFAULT_OUT = benchlib.RESULTS / "forward_batches.json"
BACKENDS = ("torch", "autocast", "onnx-int8")
VARIANTS = ("windows", "tokens")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.forward_batches", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="model directory (exported with qa_common.export_onnx --int8 for onnx-int8)")
    parser.add_argument("--data", type=Path, default=None,
                        help="SQuAD-format questions (default: SQuAD dev in ../shared, else the quickstart's)")
    parser.add_argument("--questions", type=int, default=2000, help="questions whose windows are read (default: %(default)s)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated, of: " + ", ".join(BACKENDS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file (default: %(default)s)")
    parser.add_argument("--run", nargs=2, default=None, help=argparse.SUPPRESS)  # internal: BACKEND VARIANT
    args = parser.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    if unknown := set(args.backends) - set(BACKENDS):
        parser.error(f"unknown --backends {sorted(unknown)}; choose from {', '.join(BACKENDS)}")
    return args


def resident_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith(field + ":"))


def run(args) -> dict:
    """One backend and variant in this (fresh) process; the logits' argmaxes saved for the comparison."""
    import contextlib

    import torch

    from qa_common import QAConfig, decode_predictions, evaluate_answers, inference, prepare_eval_features, read_squad
    from qa_common.backends import load_runner
    from train_job.presets import preset_values

    backend, variant = args.run
    if variant == "windows":
        inference.CPU_BATCH_TOKENS = math.inf
    runner, tokenizer, _ = load_runner(args.model, "torch" if backend == "autocast" else backend)
    records = read_squad(args.data)[:args.questions]
    qa_config = QAConfig(**preset_values("squad-minilm")["qa"])
    features = prepare_eval_features([str(i) for i in range(len(records))], [r["question"] for r in records],
                                     [r["context"] for r in records], tokenizer, qa_config)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if backend == "autocast" else contextlib.nullcontext()
    with autocast:
        inference.predict_logits(runner, {name: values[:16] for name, values in features.items()})  # first primitives
        before = resident_mib("VmRSS")
        started = time.perf_counter()
        start, end = inference.predict_logits(runner, features)
        seconds = time.perf_counter() - started
    answers = decode_predictions(features["example_id"], start, end, features["offset_mapping"],
                                 {str(i): r["context"] for i, r in enumerate(records)}, qa_config)
    _, scores = evaluate_answers(answers, {str(i): r["answers"]["text"] for i, r in enumerate(records)},
                                 version_2_with_negative=False)
    windows = len(features["input_ids"])
    return {"backend": backend, "variant": variant, "windows": windows, "seconds": seconds,
            "windows_per_s": windows / seconds, "memory_growth_mib": resident_mib("VmHWM") - before,
            "exact_match": scores["exact_match"], "f1": scores["f1"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    args.data = args.data or (benchlib.SQUAD_FULL_DEV if benchlib.SQUAD_FULL_DEV.is_file() else benchlib.QUICKSTART_VALIDATION)
    if args.run:
        benchlib.quiet_libraries()
        return benchlib.report_to_parent(run(args))
    return benchlib.run_in_workdir(measure, args, prefix="bench-forward-batches-")


def measure(args, workdir: Path, load_before: list[float]) -> int:
    from qa_common.inference import CPU_BATCH_TOKENS, FORWARD_BATCH_SIZE

    rows, ratios = [], {}
    for backend in args.backends:
        for variant in VARIANTS:
            rows.append(benchlib.in_fresh_process("bench.forward_batches", "--model", args.model, "--data",
                                                  str(args.data), "--questions", str(args.questions),
                                                  "--run", backend, variant))
            print(f"{backend}, {variant}: {rows[-1]['windows_per_s']:.1f} windows/s, "
                  f"+{rows[-1]['memory_growth_mib']:.0f} MiB", flush=True)
        windows, tokens = rows[-2], rows[-1]
        ratios[f"{backend}_tokens_vs_windows_windows_per_s"] = tokens["windows_per_s"] / windows["windows_per_s"]
        ratios[f"{backend}_memory_growth_saved_mib"] = windows["memory_growth_mib"] - tokens["memory_growth_mib"]
        ratios[f"{backend}_f1_change"] = tokens["f1"] - windows["f1"]
    benchlib.print_table("predict_logits by forward batch", rows,
                         ["backend", "variant", "windows", "windows_per_s", "memory_growth_mib", "exact_match", "f1"])
    benchlib.print_table("Ratios", [{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    benchlib.write_json(args.out, "forward_batches", ratios, {"runs": rows},
                        {"model": args.model, "data": benchlib.data_label(args.data), "questions": args.questions,
                         "forward_batch_size": FORWARD_BATCH_SIZE, "cpu_batch_tokens": CPU_BATCH_TOKENS}, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
