"""The GPU suite: every GPU figure of BENCHMARKS.md from one command on one GPU, within about 9 minutes.

    python -m bench.gpu_suite --prepare      # here, once: the data and MiniLM into .gpu-suite/ (carried)
    python -m bench.gpu_suite                # on the GPU machine (bench/gpu_suite.sh sets up Ray there)
    python -m bench.gpu_suite --dry-run      # on CPU, tiny models and settings: checks the whole path

Steps, each a ``python -m ...`` process with its own time budget (a step over budget is stopped and
recorded as timed out; the suite goes on):

1. ``train``: bench.train_throughput --gpu --ablate: seed recipe (HF Trainer, fp16) vs our Ray Train
   loop (bf16) on the bert-base shape, compile on, then off (and length grouping off);
2. ``serve``: bench.serve_load --gpu: windows/s and p50/p99 under load, single-question latency;
3. ``cold``: bench.cold_start --gpu: zero replicas to the first answer;
4. ``cuda_graph``: bench.cuda_graph_latency --gpu: single question, eager vs CUDA graphs (padded buckets);
5. ``squad``: bench.squad_finetune --gpu: MiniLM fine-tuned with train_job's recipe (bf16) on the full
   SQuAD v1.1 train set, evaluated on all of dev (EM/F1); in-process, no Ray.

Writes ``STEP.json`` per step, ``suite.json`` (every step's status, wall time and headline figures)
and ``suite.md`` (the same as a markdown table) into ``--out-dir``.

Data and model on the GPU machine: only the repository and the carried paths travel there (not
``../shared``), at most 64 MiB a call. ``--prepare`` copies SQuAD v1.1 (``--squad-dir``, default
``../shared/data/squad-v1.1-full``; 8.5 MiB) into ``.gpu-suite/data/``, MiniLM's tokenizer into
``.gpu-suite/tokenizer/`` and all-MiniLM-L6-v2 in bfloat16 (44 MiB) into ``.gpu-suite/minilm/``. Ray's
bundle (47 MiB) and MiniLM do not fit one call together, so the suite is two calls on one warm machine
(bench/gpu_suite.sh shows them): the Ray steps carrying the bundle, data and tokenizer, then the squad
step (no Ray) carrying .gpu-suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench import benchlib, models

SUITE_DIR = benchlib.REPO / ".gpu-suite"
SQUAD_FILES = {"train": "train-v1.1.reconstructed.json.gz", "dev": "dev-v1.1.reconstructed.json.gz"}
STEPS = ("train", "serve", "cold", "cuda_graph", "squad")
# Seconds per step on the GPU (9 minutes in all with Ray's start-ups). The dry run does far less work,
# but on a small shared CPU a Ray start alone can take minutes.
GPU_BUDGET_S = {"train": 150, "serve": 75, "cold": 60, "cuda_graph": 75, "squad": 180}
DRY_BUDGET_S = {step: 600 for step in STEPS}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="on CPU with tiny models and settings")
    parser.add_argument("--prepare", action="store_true", help="copy the data and MiniLM into .gpu-suite/ and stop")
    parser.add_argument("--steps", default=",".join(STEPS), help="which steps, in order (default: %(default)s)")
    parser.add_argument("--squad-dir", type=Path, default=benchlib.SHARED_DATA / "squad-v1.1-full",
                        help="where --prepare reads SQuAD v1.1 (default: ../shared/data/squad-v1.1-full)")
    parser.add_argument("--data-dir", type=Path, default=SUITE_DIR / "data",
                        help="SQuAD v1.1 train and dev files on the GPU machine (default: .gpu-suite/data)")
    parser.add_argument("--minilm", type=Path, default=SUITE_DIR / "minilm",
                        help="MiniLM model directory for the squad step (default: .gpu-suite/minilm)")
    parser.add_argument("--tokenizer", type=Path, default=SUITE_DIR / "tokenizer",
                        help="MiniLM's tokenizer for the other steps' bert-base shape (default: .gpu-suite/tokenizer)")
    parser.add_argument("--squad-epochs", type=int, default=1, help="epochs of the squad step (default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=benchlib.RESULTS / "gpu_suite",
                        help="where the JSON files and suite.md go (default: %(default)s)")
    args = parser.parse_args(argv)
    args.steps = [step.strip() for step in args.steps.split(",") if step.strip()]
    if set(args.steps) - set(STEPS):
        parser.error(f"--steps takes {', '.join(STEPS)}")
    return args


def prepare(args) -> int:
    """The data and a bfloat16 MiniLM (half the bytes: it must fit the 64 MiB carry) into .gpu-suite/."""
    import torch
    from transformers import AutoModelForQuestionAnswering

    from qa_common import MINILM, load_tokenizer, resolve_model_path

    args.data_dir.mkdir(parents=True, exist_ok=True)
    for name in SQUAD_FILES.values():
        shutil.copyfile(args.squad_dir / name, args.data_dir / name)
    model = AutoModelForQuestionAnswering.from_pretrained(resolve_model_path(MINILM), dtype=torch.bfloat16)
    model.save_pretrained(args.minilm)
    for directory in (args.minilm, args.tokenizer):
        load_tokenizer(MINILM).save_pretrained(directory)
    size = sum(path.stat().st_size for path in SUITE_DIR.rglob("*") if path.is_file()) if args.minilm.is_relative_to(SUITE_DIR) else None
    print(f"prepared {args.data_dir} and {args.minilm}" + (f" ({size / 2**20:.1f} MiB in {SUITE_DIR.name}/)" if size else ""))
    return 0


def suite_model(args, workdir: Path) -> str:
    """The model of the speed steps: the bert-base shape with random weights and MiniLM's tokenizer read
    from .gpu-suite (the GPU machine has no MiniLM package); BERT-tiny for --dry-run."""
    if args.dry_run:
        return models.prepare_model_dir("bert-tiny", workdir / "tiny-model")
    return models.prepare_model_dir("bert-base", workdir / "bert-base", tokenizer_source=str(args.tokenizer))


def step_commands(args, workdir: Path, model_dir: str) -> dict[str, list[str]]:
    """``{step: python argv}`` for the GPU, or tiny CPU versions for --dry-run."""
    out = {step: ["--out", str(args.out_dir / f"{step}.json")] for step in STEPS}
    if not args.dry_run:
        train, dev = (args.data_dir / SQUAD_FILES[split] for split in ("train", "dev"))
        bert = ["--model", model_dir]
        return {
            "train": ["-m", "bench.train_throughput", "--gpu", "--ablate", *bert, "--data", str(train),
                      "--max-train-samples", "4000", "--repeat", "1", "--eval-data", str(dev), *out["train"]],
            "serve": ["-m", "bench.serve_load", "--gpu", *bert, "--data", str(dev), "--modes", "batched,single",
                      "--requests", "2000", "--single-requests", "200", *out["serve"]],
            "cold": ["-m", "bench.cold_start", "--gpu", *bert, "--repeats", "2", *out["cold"]],
            "cuda_graph": ["-m", "bench.cuda_graph_latency", "--gpu", *bert, "--data", str(dev), "--questions", "300",
                           *out["cuda_graph"]],
            "squad": ["-m", "bench.squad_finetune", "--gpu", "--model", str(args.minilm), "--train", str(train),
                      "--dev", str(dev), "--epochs", str(args.squad_epochs), *out["squad"]],
        }
    tiny = model_dir
    fixture = benchlib.QUICKSTART_VALIDATION
    windows = ["--max-length", "96", "--stride", "32", "--max-question-length", "24"]
    return {
        "train": ["-m", "bench.train_throughput", "--model", tiny, "--data", str(benchlib.QUICKSTART_TRAIN),
                  "--eval-data", str(fixture), "--max-train-samples", "16", "--batch-size", "4", "--seed-steps", "2",
                  "--warmup-steps", "1", "--epochs", "1", "--eval-questions", "2", "--cpus", "2", *windows, *out["train"]],
        "serve": ["-m", "bench.serve_load", "--model", tiny, "--data", str(fixture), "--modes", "batched,single",
                  "--requests", "8", "--single-requests", "4", "--concurrency", "4", "--warmup", "2",
                  "--max-batch-size", "4", "--cpus", "2", "--replica-cpus", "0.5", *out["serve"]],
        "cold": ["-m", "bench.cold_start", "--model", tiny, "--repeats", "1", "--cpus", "2", "--replica-cpus", "0.5",
                 *out["cold"]],
        "cuda_graph": ["-m", "bench.cuda_graph_latency", "--model", tiny, "--data", str(fixture), "--questions", "4",
                       "--lengths", "48,96", *windows, *out["cuda_graph"]],
        "squad": ["-m", "bench.squad_finetune", "--model", tiny, "--train", str(benchlib.QUICKSTART_TRAIN),
                  "--dev", str(fixture), "--max-train-samples", "16", "--max-eval-samples", "8", "--batch-size", "8",
                  *windows, *out["squad"]],
    }


def headline(step: str, args) -> dict:
    """The step's figures for the summary: the ratios of its JSON file."""
    return json.loads((args.out_dir / f"{step}.json").read_text(encoding="utf-8"))["ratios"]


def run_step(step: str, command: list[str], budget_s: float, args) -> dict:
    print(f"[suite] {step}: python {' '.join(command)} (budget {budget_s:.0f} s)", flush=True)
    clock = benchlib.Stopwatch()
    # Its own process group, so that a step over budget is stopped with the Ray processes it started.
    process = subprocess.Popen([sys.executable, *command], cwd=benchlib.REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        stdout, stderr = process.communicate(timeout=budget_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, _ = process.communicate()
        return {"step": step, "status": f"timed out after {budget_s:.0f} s", "wall_s": clock(), "log_tail": stdout[-1500:]}
    row = {"step": step, "status": "ok" if process.returncode == 0 else f"exit {process.returncode}", "wall_s": clock()}
    if process.returncode == 0:
        row["figures"] = headline(step, args)
    else:
        row["log_tail"] = (stdout[-1500:] + "\n" + stderr[-2500:]).strip()
    return row


def summary_markdown(rows: list[dict], dry_run: bool) -> str:
    table = []
    for row in rows:
        figures = row.get("figures") or {"-": row["status"]}
        for name, value in figures.items():
            table.append({"step": row["step"], "figure": name, "value": value, "step wall s": round(row["wall_s"], 1)})
    note = "Dry run on CPU with tiny models: checks the path, the figures mean nothing.\n\n" if dry_run else ""
    return note + benchlib.markdown_table(table) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prepare:
        return prepare(args)
    return benchlib.run_in_workdir(measure, args, prefix="bench-gpu-suite-")


def measure(args, workdir: Path, load_before: list[float]) -> int:
    if not args.dry_run:
        needed = [args.data_dir / SQUAD_FILES["dev"]]
        needed += [args.minilm / "config.json", args.data_dir / SQUAD_FILES["train"]] if "squad" in args.steps else []
        needed += [args.tokenizer / "tokenizer.json"] if set(args.steps) - {"squad"} else []
        missing = [str(path) for path in needed if not path.is_file()]
        if missing:
            raise SystemExit(f"missing {', '.join(missing)}: run `python -m bench.gpu_suite --prepare` in a development "
                             "checkout and carry .gpu-suite, or pass --data-dir / --minilm")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    commands = step_commands(args, workdir, suite_model(args, workdir) if args.dry_run or set(args.steps) - {"squad"} else "")
    budgets = DRY_BUDGET_S if args.dry_run else GPU_BUDGET_S
    clock = benchlib.Stopwatch()
    rows = []
    for step in args.steps:
        rows.append(run_step(step, commands[step], budgets[step], args))
        print(f"[suite] {step}: {rows[-1]['status']} in {rows[-1]['wall_s']:.0f} s", flush=True)
    document = {"benchmark": "gpu_suite", "dry_run": args.dry_run, "total_s": clock(), "steps": rows,
                "machine": benchlib.machine(), "load_average": {"before": load_before, "after": benchlib.load_average()},
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (args.out_dir / "suite.json").write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    markdown = summary_markdown(rows, args.dry_run)
    (args.out_dir / "suite.md").write_text(markdown, encoding="utf-8")
    print(f"\n{markdown}\n[suite] {len(rows)} steps in {document['total_s']:.0f} s; wrote {args.out_dir}/suite.json and suite.md")
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
