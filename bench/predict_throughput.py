"""Batch answering: ``train_job.predict`` (Ray Data actors) against one process, and its driver's memory.

    python -m bench.predict_throughput                 # CPU: the SQuAD dev sample article, packaged MiniLM
    python -m bench.predict_throughput --memory        # + driver peak memory, 20k vs 200k questions
    python -m bench.predict_throughput --gpu           # one GPU: bert-base shape, bf16, the dev sample x 20

Data: the dev sample article (810 questions, one or two 384-token windows each) plus
``--long-documents`` of its questions asked over five consecutive paragraphs (several windows each,
gold answers shifted to match), written to one JSON Lines file.

- single process: ``qa_common.answer_questions`` over the questions in batches of ``--batch-size``,
  in this process, timed once the model is loaded and warm (torch on every core); the model load
  (libraries already imported) is reported apart.
- train_job.predict: ``prepare`` + ``predict`` on a fresh local Ray, for each actor count of
  ``--actors`` (each actor gets CPUs / actors cores). Timed end to end (reading, starting the actors,
  loading the model, answering, writing) and from its first answers on (steady state).
- memory (``--memory``): ``python -m train_job.predict`` as a subprocess on 20,000 and 200,000
  questions (the dev set repeated, JSON Lines) with a small random model (``--memory-model``); the
  driver's peak resident memory (VmHWM of its process) is read while it runs.

Figures: questions/s and windows/s (windows counted with the model's tokenizer and qa_config.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import benchlib, models
from bench.local_service import windows_per_payload
from qa_common.inference import FORWARD_BATCH_SIZE

DEFAULT_OUT = benchlib.RESULTS / "predict_throughput.json"
PARAGRAPHS_PER_DOCUMENT = 5


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.predict_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="one GPU actor, bert-base shape, bf16, the data x 20")
    parser.add_argument("--model", help=f"{models.MODEL_HELP} (default: minilm on CPU, bert-base with --gpu)")
    parser.add_argument("--data", type=Path, default=None,
                        help=f"SQuAD-format questions (default: {benchlib.data_label(benchlib.default_eval_data())})")
    parser.add_argument("--repeat", type=int, default=None, help="repeat the questions N times (default: 1; 20 with --gpu)")
    parser.add_argument("--long-documents", type=int, default=60,
                        help=f"questions also asked over {PARAGRAPHS_PER_DOCUMENT} paragraphs (default: %(default)s)")
    parser.add_argument("--actors", default=None,
                        help="comma-separated actor counts to run (default: 1 and every CPU; 1 with --gpu)")
    parser.add_argument("--batch-size", type=int, default=None, help="questions per actor call (default: 256; 2048 with --gpu)")
    parser.add_argument("--forward-batch-size", type=int, default=None,
                        help="windows per forward pass (default: 64 on CPU, 512 with --gpu)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="weights of both methods (default: auto, bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray (default: %(default)s)")
    parser.add_argument("--skip-baseline", action="store_true", help="skip the single-process baseline")
    parser.add_argument("--memory", action="store_true", help="also measure the driver's peak memory")
    parser.add_argument("--memory-questions", default="20000,200000",
                        help="question counts of the memory runs (default: %(default)s)")
    parser.add_argument("--memory-model", default="bert-micro",
                        help="model of the memory runs, a shape or directory (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file (default: %(default)s)")
    args = parser.parse_args(argv)
    args.model = args.model or ("bert-base" if args.gpu else "minilm")
    args.data = args.data or benchlib.default_eval_data()
    args.repeat = args.repeat or (20 if args.gpu else 1)
    args.batch_size = args.batch_size or (2048 if args.gpu else 256)
    args.forward_batch_size = args.forward_batch_size or (512 if args.gpu else FORWARD_BATCH_SIZE)
    actors = args.actors or ("1" if args.gpu else ",".join(dict.fromkeys(["1", str(args.cpus)])))
    args.actors = [int(count) for count in actors.split(",")]
    args.memory_questions = [int(count) for count in args.memory_questions.split(",")]
    if args.gpu and args.actors != [1]:
        parser.error("--gpu runs one actor on the one GPU")
    return args


# --- data ------------------------------------------------------------------------------------------


def benchmark_records(args) -> list[dict]:
    """The data's records repeated ``--repeat`` times, plus the long-document questions."""
    from qa_common import read_squad

    records = read_squad(args.data)
    paragraphs = list(dict.fromkeys(record["context"] for record in records))
    long_documents = []
    for record in records[: args.long_documents]:
        index = paragraphs.index(record["context"])
        first = max(0, min(index - PARAGRAPHS_PER_DOCUMENT // 2, len(paragraphs) - PARAGRAPHS_PER_DOCUMENT))
        chosen = paragraphs[first : first + PARAGRAPHS_PER_DOCUMENT]
        shift = sum(len(p) + 2 for p in chosen[: index - first])  # joined with "\n\n"
        long_documents.append({
            **record, "id": record["id"] + "-long", "context": "\n\n".join(chosen),
            "answers": {"text": record["answers"]["text"],
                        "answer_start": [start + shift for start in record["answers"]["answer_start"]]},
        })
    repeated = [{**r, "id": f"{r['id']}-{n}"} if args.repeat > 1 else r for n in range(args.repeat) for r in records]
    return repeated + long_documents


def write_jsonl(records, path: Path) -> Path:
    with path.open("w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps({k: record[k] for k in ("id", "question", "context", "answers")}) + "\n")
    return path


def write_repeated_jsonl(source: Path, count: int, path: Path) -> Path:
    """``count`` questions: the records of ``source`` again and again with fresh ids, written as they go."""
    from qa_common import read_squad

    records = read_squad(source)
    with path.open("w", encoding="utf-8") as file:
        for n in range(count):
            record = records[n % len(records)]
            file.write(json.dumps({"id": f"{record['id']}-{n // len(records)}", "question": record["question"],
                                   "context": record["context"], "answers": record["answers"]}) + "\n")
    return path


# --- measuring -------------------------------------------------------------------------------------


def count_windows(model_dir: str, records: list[dict]) -> int:
    """Total windows of ``records`` with the model's tokenizer and QAConfig."""
    return sum(windows_per_payload(records, model_dir))


def run_single_process(records, model_dir: str, args, windows: int) -> dict:
    import torch

    from qa_common import Question, answer_questions, load_model_and_tokenizer, load_qa_config
    from qa_common.modeling import torch_dtype

    device = "cuda" if args.gpu else "cpu"
    load_clock = benchlib.Stopwatch()
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype=torch_dtype(args.dtype, device))
    model = model.to(device).eval()
    qa_config = load_qa_config(model_dir)
    load_s = load_clock()
    questions = [Question(r["question"], r["context"]) for r in records]
    answer_questions(model, tokenizer, questions[:8], qa_config, batch_size=args.forward_batch_size)  # warm-up
    clock = benchlib.Stopwatch()
    for begin in range(0, len(questions), args.batch_size):
        answer_questions(model, tokenizer, questions[begin : begin + args.batch_size], qa_config,
                         batch_size=args.forward_batch_size)
    seconds = clock()
    return {"method": "single process: answer_questions", "actors": 0, "cpus_per_actor": torch.get_num_threads(),
            "questions": len(questions), "windows": windows, "seconds": seconds,
            "questions_per_s": len(questions) / seconds, "windows_per_s": windows / seconds,
            "model_load_s": load_s, "load_average": benchlib.load_average()}


def run_pipeline(data: Path, model_dir: str, args, actors: int, windows: int, workdir: Path) -> dict:
    from train_job.predict import parse_args, predict, prepare

    cpus_per_actor = max(1, args.cpus // actors) if not args.gpu else max(1, args.cpus - 1)
    flags = ["--model", model_dir, "--data", str(data), "--output", str(workdir / f"out-{actors}"),
             "--concurrency", str(actors), "--cpus-per-actor", str(cpus_per_actor), "--batch-size", str(args.batch_size),
             "--forward-batch-size", str(args.forward_batch_size), "--backend", "torch", "--dtype", args.dtype]
    if args.gpu:
        flags += ["--num-gpus-per-actor", "1"]
    predict_args = parse_args(flags)
    summary = predict(predict_args, prepare(predict_args))
    seconds, steady = summary["seconds"], summary.get("questions_per_s_after_first_answers")  # None: one block
    return {"method": "train_job.predict", "actors": actors, "cpus_per_actor": cpus_per_actor,
            "questions": summary["questions"], "windows": windows, "seconds": seconds,
            "questions_per_s": summary["questions"] / seconds, "windows_per_s": windows / seconds,
            "first_answers_s": summary.get("first_answers_s"), "steady_questions_per_s": steady,
            "steady_windows_per_s": steady * windows / summary["questions"] if steady else None,
            "f1": summary.get("metrics", {}).get("f1"), "load_average": benchlib.load_average()}


def driver_peak_memory(data: Path, model_dir: str, args, workdir: Path, questions: int) -> dict:
    """Run ``python -m train_job.predict`` in a subprocess and follow its peak resident memory."""
    command = [sys.executable, "-m", "train_job.predict", "--model", model_dir, "--data", str(data),
               "--output", str(workdir / f"memory-{questions}"), "--concurrency", str(args.cpus),
               "--batch-size", "512"]
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a private local Ray, never a cluster running here
    clock = benchlib.Stopwatch()
    process = subprocess.Popen(command, cwd=benchlib.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    peak_kib = 0
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            peak_kib = max(peak_kib, int(next(line for line in status.read_text().splitlines()
                                               if line.startswith("VmHWM")).split()[1]))
        except (OSError, StopIteration, ValueError):
            pass
        time.sleep(0.2)
    output = process.stdout.read()
    if process.returncode != 0:
        raise SystemExit(f"train_job.predict failed on {questions} questions:\n{output[-3000:]}")
    return {"questions": questions, "input_mib": round(data.stat().st_size / 2**20, 1),
            "driver_peak_rss_mib": round(peak_kib / 1024, 1), "seconds": clock(), "actors": args.cpus,
            "load_average": benchlib.load_average()}


def main(argv=None) -> int:
    return benchlib.run_in_workdir(measure, parse_args(argv), prefix="bench-predict-")


def measure(args, workdir: Path, load_before: list[float]) -> int:
    model_dir = models.prepare_model_dir(args.model, workdir / "model")
    records = benchmark_records(args)
    data = write_jsonl(records, workdir / "questions.jsonl")
    windows = count_windows(model_dir, records)
    print(f"[bench] {len(records)} questions, {windows} windows ({args.long_documents} over "
          f"{PARAGRAPHS_PER_DOCUMENT} paragraphs) from {benchlib.data_label(args.data)}", flush=True)

    runs = []
    if not args.skip_baseline:
        print("[bench] single process ...", flush=True)
        runs.append(run_single_process(records, model_dir, args, windows))
    with benchlib.local_ray(args.cpus):
        for actors in args.actors:
            print(f"[bench] train_job.predict, {actors} actor(s) ...", flush=True)
            runs.append(run_pipeline(data, model_dir, args, actors, windows, workdir))

    memory = []
    if args.memory:
        memory_model = models.prepare_model_dir(args.memory_model, workdir / "memory-model")
        for count in args.memory_questions:
            print(f"[bench] driver memory, {count} questions ...", flush=True)
            path = write_repeated_jsonl(args.data, count, workdir / f"repeated-{count}.jsonl")
            memory.append(driver_peak_memory(path, memory_model, args, workdir, count))
            path.unlink()

    pipelines = [run for run in runs if run["method"] == "train_job.predict"]
    best = max(pipelines, key=lambda run: run["questions_per_s"])
    ratios = {"pipeline_best_windows_per_s": round(best["windows_per_s"], 1),
              "pipeline_best_steady_windows_per_s": best["steady_windows_per_s"] and round(best["steady_windows_per_s"], 1)}
    if not args.skip_baseline:
        single = runs[0]
        for run in pipelines:
            ratios[f"pipeline_{run['actors']}_actors_vs_single_process"] = benchlib.ratio(
                run["questions_per_s"], single["questions_per_s"])
            ratios[f"pipeline_{run['actors']}_actors_steady_vs_single_process"] = benchlib.ratio(
                run["steady_questions_per_s"], single["questions_per_s"])
    if len(memory) >= 2:
        ratios["driver_peak_memory_largest_vs_smallest"] = benchlib.ratio(memory[-1]["driver_peak_rss_mib"],
                                                                          memory[0]["driver_peak_rss_mib"])
    benchlib.print_table("Ratios", [{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    benchlib.print_table("Batch answering", runs,
                         ["method", "actors", "cpus_per_actor", "questions", "windows", "seconds", "questions_per_s",
                          "windows_per_s", "model_load_s", "first_answers_s", "steady_questions_per_s", "steady_windows_per_s",
                          "load_average"])
    if memory:
        benchlib.print_table("Driver peak memory", memory,
                             ["questions", "input_mib", "driver_peak_rss_mib", "seconds", "actors", "load_average"])
    settings = {key: (benchlib.data_label(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    settings.update(model_shape=models.model_summary(model_dir), questions=len(records), windows=windows)
    settings.pop("out")
    benchlib.write_json(args.out, "predict_throughput", ratios, {"runs": runs, "memory": memory}, settings, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
