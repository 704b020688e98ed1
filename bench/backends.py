"""CPU inference backends side by side, in one run: torch fp32, torch bf16, ONNX fp32, ONNX int8.

    python -m qa_common.export_onnx MODEL_DIR --optimize --int8 --validation-file DEV   # once
    python -m bench.backends --model MODEL_DIR --eval-data DEV --eval-data OTHER

For each backend: single-question p50 over HTTP and batched windows/s under ``--concurrency``
clients (``bench.serve_load --modes batched,single``), cold start to the first answer
(``bench.cold_start``), the model file's size, and EM/F1 on every ``--eval-data`` file (the same
windowing and decoding as serving, in this process). Also which backend serve_app's ``auto`` picks
from the model's ``onnx_export.json``, and the target ratios of that backend against torch fp32.
Each serving measurement runs as its own ``python -m bench.<script>`` process with its own local Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench import benchlib, models

DEFAULT_OUT = benchlib.RESULTS / "backends.json"
# (label, serve_app backend, serve_app dtype)
CONFIGURATIONS = [("torch fp32", "torch", "float32"), ("torch bf16", "torch", "bfloat16"),
                  ("onnx fp32", "onnx", "float32"), ("onnx int8", "onnx-int8", "float32")]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.backends", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory exported with qa_common.export_onnx --int8")
    parser.add_argument("--eval-data", type=Path, action="append", default=[],
                        help="SQuAD-format file to measure EM/F1 on (repeatable; default: the bundled validation set)")
    parser.add_argument("--max-eval-questions", type=int, default=None,
                        help="EM/F1 on the first N questions of each --eval-data file (default: all)")
    parser.add_argument("--data", type=Path, default=None, help="questions for the load (default: bench.serve_load's)")
    parser.add_argument("--requests", type=int, default=160, help="timed batched requests (default: %(default)s)")
    parser.add_argument("--single-requests", type=int, default=40, help="timed single requests (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=16, help="clients of the batched load (default: %(default)s)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="questions per model call (default: %(default)s)")
    parser.add_argument("--replica-cpus", type=float, default=2, help="CPUs (threads) of the replica (default: %(default)s)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of each local Ray (default: %(default)s)")
    parser.add_argument("--backends", default=",".join(label for label, _, _ in CONFIGURATIONS),
                        help="which configurations, comma-separated (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file (default: %(default)s)")
    args = parser.parse_args(argv)
    args.eval_data = args.eval_data or [benchlib.QUICKSTART_VALIDATION]
    chosen = [label.strip() for label in args.backends.split(",")]
    unknown = set(chosen) - {label for label, _, _ in CONFIGURATIONS}
    if unknown:
        parser.error(f"--backends: unknown {', '.join(sorted(unknown))}")
    args.configurations = [c for c in CONFIGURATIONS if c[0] in chosen]
    return args


def run_script(script: str, out: Path, flags: list[str]) -> dict:
    command = [sys.executable, "-m", f"bench.{script}", "--out", str(out), *flags]
    result = subprocess.run(command, cwd=benchlib.REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(out.read_text(encoding="utf-8"))


def accuracy(model_dir: str, backend: str, dtype: str, eval_data: list[Path], max_questions: int | None) -> dict:
    """EM/F1 per file with the serving code path's windowing and decoding."""
    import torch

    from qa_common import load_qa_config, read_squad
    from qa_common.backends import load_runner
    from qa_common.export_onnx import probe_features, scores
    from qa_common.inference import predict_logits

    runner, tokenizer, _ = load_runner(model_dir, backend, dtype=getattr(torch, dtype))
    config = load_qa_config(model_dir)
    found = {}
    for path in eval_data:
        records = read_squad(path)[:max_questions]
        features = probe_features(records, tokenizer, config, vocab_size=0)
        result = scores(records, features, predict_logits(runner, features, batch_size=32), config)
        found[benchlib.data_label(path)] = {"exact_match": result["exact_match"], "f1": result["f1"]}
    return found


def file_mb(model_dir: str, backend: str) -> float:
    from qa_common.backends import ONNX_FILES

    name = ONNX_FILES.get(backend, "model.safetensors")
    return (Path(model_dir) / name).stat().st_size / 1e6


def main(argv=None) -> int:
    return benchlib.run_in_workdir(measure, parse_args(argv), prefix="bench-backends-")


def measure(args, workdir: Path, load_before: list[float]) -> int:
    from qa_common.backends import choose_backend, read_export_record

    model_dir = str(Path(args.model).resolve())
    data_flags = ["--data", str(args.data)] if args.data else []
    rows = []
    for label, backend, dtype in args.configurations:
        print(f"[bench] {label}: serving load ...", flush=True)
        load = run_script("serve_load", workdir / "load.json", [
            "--model", model_dir, "--backend", backend, "--dtype", dtype, "--modes", "batched,single",
            "--requests", str(args.requests), "--single-requests", str(args.single_requests),
            "--concurrency", str(args.concurrency), "--max-batch-size", str(args.max_batch_size),
            "--replica-cpus", str(args.replica_cpus), "--cpus", str(args.cpus), *data_flags])
        modes = {row["mode"]: row for row in load["results"]["modes"]}
        print(f"[bench] {label}: cold start ...", flush=True)
        cold = run_script("cold_start", workdir / "cold.json", [
            "--model", model_dir, "--backend", backend, "--dtype", dtype, "--repeats", "1",
            "--replica-cpus", str(args.replica_cpus), "--cpus", str(args.cpus)])
        print(f"[bench] {label}: accuracy ...", flush=True)
        row = {"backend": label, "single_p50_ms": modes["single"]["p50_ms"],
               "batched_windows_per_s": modes["batched"]["windows_per_s"], "batched_p50_ms": modes["batched"]["p50_ms"],
               "cold_start_s": cold["ratios"]["cold_start_median_s"], "file_mb": file_mb(model_dir, backend),
               "errors": modes["batched"]["errors"] + modes["single"]["errors"]}
        for data, metrics in accuracy(model_dir, backend, dtype, args.eval_data, args.max_eval_questions).items():
            row[f"EM {Path(data).name}"], row[f"F1 {Path(data).name}"] = metrics["exact_match"], metrics["f1"]
        rows.append(row)
        benchlib.print_table("so far", rows, list(row))

    auto = choose_backend(read_export_record(model_dir), device="cpu")
    by_label = {row["backend"]: row for row in rows}
    auto_label = next(label for label, backend, dtype in CONFIGURATIONS if backend == auto)
    ratios = {"auto_picks": auto_label}
    if {"torch fp32", auto_label} <= by_label.keys():
        base, chosen = by_label["torch fp32"], by_label[auto_label]
        ratios["auto_vs_torch_fp32_batched_windows_per_s"] = benchlib.ratio(chosen["batched_windows_per_s"], base["batched_windows_per_s"])
        ratios["torch_fp32_vs_auto_single_p50"] = benchlib.ratio(base["single_p50_ms"], chosen["single_p50_ms"])
        for key in base:
            if key.startswith("F1 "):
                ratios[f"auto_f1_loss {key[3:]}"] = round(base[key] - chosen[key], 2)
    benchlib.print_table("Ratios", [{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    benchlib.print_table("CPU backends", rows, list(rows[0]))
    settings = {key: (benchlib.data_label(value) if isinstance(value, Path) else value)
                for key, value in vars(args).items() if key not in ("out", "configurations")}
    settings.update(eval_data=[benchlib.data_label(path) for path in args.eval_data],
                    model_shape=models.model_summary(model_dir), export=read_export_record(model_dir))
    benchlib.write_json(args.out, "backends", ratios, {"backends": rows}, settings, load_before)
    print("\n" + benchlib.markdown_table(rows))
    return 0 if all(row["errors"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
