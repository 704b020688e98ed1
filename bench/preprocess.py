"""Preprocessing throughput: SQuAD questions to training windows, Ray Data against one process.

    python -m bench.preprocess                  # the quickstart questions replicated to 10,000
    python -m bench.preprocess --full           # the full SQuAD v1.1 train set (../shared, ~88k questions)

- ray-data: the featurisation of ``train_job`` — ``ray.data.from_items`` of the question rows, then
  ``map_batches(train_job.data.train_features_of, batch_size=256, concurrency=C,
  udf_modifying_row_count=True)`` (tasks; each worker process keeps the tokenizer) and
  ``materialize()`` — on a fresh local Ray with C = every CPU. Run ``--runs`` times in the same
  Ray: the first includes loading the tokenizer in each worker process.
- single process: ``qa_common.prepare_train_features`` over the same questions in batches of 256 in
  this process (the tokenizer's own Rust threads still run in parallel).

Figures: questions (examples) per second and windows (features) per second.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench import benchlib
from qa_common import QAConfig
from qa_common.config import add_dataclass_flags, given_flags

DEFAULT_OUT = benchlib.RESULTS / "preprocess.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true",
                        help=f"the full SQuAD v1.1 train set ({benchlib.data_label(benchlib.SQUAD_FULL_TRAIN)})")
    parser.add_argument("--data", type=Path, default=None,
                        help="SQuAD-format questions (default: train_job/quickstart_data/quickstart-train.jsonl)")
    parser.add_argument("--examples", type=int, default=None,
                        help="replicate (or cut) the questions to N (default: 10,000; all of them with --full)")
    parser.add_argument("--tokenizer", default="sentence-transformers/all-MiniLM-L6-v2",
                        help="tokenizer: a local model directory or the packaged MiniLM (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="questions per map_batches call (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=os.cpu_count(),
                        help="featurising tasks at once (default: every CPU, %(default)s)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=2, help="Ray Data runs in the same Ray (default: %(default)s)")
    parser.add_argument("--skip-baseline", action="store_true", help="skip the single-process baseline")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file (default: %(default)s)")
    add_dataclass_flags(parser, QAConfig)
    args = parser.parse_args(argv)
    args.qa = QAConfig(**given_flags(args, QAConfig))
    if args.full:
        if args.data:
            parser.error("give --full or --data, not both")
        if not benchlib.SQUAD_FULL_TRAIN.is_file():
            parser.error(f"--full needs {benchlib.SQUAD_FULL_TRAIN}, which does not exist here")
        args.data = benchlib.SQUAD_FULL_TRAIN
    else:
        args.data = args.data or benchlib.QUICKSTART_TRAIN
        args.examples = args.examples or 10_000
    return args


def question_rows(args) -> list[dict]:
    """The rows ``train_job.data.feature_datasets`` builds: question, context, first answer."""
    from qa_common import read_squad

    records = read_squad(args.data)
    rows = [{"question": r["question"], "context": r["context"],
             "answer_start": r["answers"]["answer_start"][0], "answer_text": r["answers"]["text"][0]} for r in records]
    if args.examples:
        rows = [rows[i % len(rows)] for i in range(args.examples)]
    return rows


def run_single_process(rows, args, qa_config) -> dict:
    from qa_common import load_tokenizer, prepare_train_features

    tokenizer = load_tokenizer(args.tokenizer)
    clock = benchlib.Stopwatch()
    features = 0
    for begin in range(0, len(rows), args.batch_size):
        batch = rows[begin : begin + args.batch_size]
        out = prepare_train_features([r["question"] for r in batch], [r["context"] for r in batch],
                                     [r["answer_start"] for r in batch], [r["answer_text"] for r in batch],
                                     tokenizer, qa_config)
        features += len(out["input_ids"])
    seconds = clock()
    return {"method": "single process: qa_common.prepare_train_features", "run": 1, "concurrency": 1,
            "examples": len(rows), "features": features, "seconds": seconds,
            "examples_per_s": len(rows) / seconds, "features_per_s": features / seconds,
            "load_average": benchlib.load_average()}


def run_ray_data(rows, args, qa_config, run: int) -> dict:
    import ray.data

    from train_job.data import tokenizer_stamp, train_features_of

    clock = benchlib.Stopwatch()
    dataset = ray.data.from_items(rows)
    from_items_s = clock()
    features = dataset.map_batches(
        train_features_of, fn_kwargs={"model": args.tokenizer, "stamp": tokenizer_stamp(args.tokenizer),
                                      "qa_config": qa_config},
        batch_size=args.batch_size, batch_format="numpy", concurrency=args.concurrency,
        udf_modifying_row_count=True,
    ).materialize()
    seconds = clock()
    count = features.count()
    return {"method": "Ray Data: map_batches(train_features_of)", "run": run, "concurrency": args.concurrency,
            "examples": len(rows), "features": count, "seconds": seconds, "from_items_s": from_items_s,
            "examples_per_s": len(rows) / seconds, "features_per_s": count / seconds,
            "load_average": benchlib.load_average()}


def main(argv=None) -> int:
    args = parse_args(argv)
    benchlib.quiet_libraries()
    load_before = benchlib.load_average()
    from qa_common import resolve_model_path

    args.tokenizer = resolve_model_path(args.tokenizer)
    qa_config = args.qa
    clock = benchlib.Stopwatch()
    rows = question_rows(args)
    read_s = clock()
    print(f"[bench] {len(rows)} questions from {benchlib.data_label(args.data)} (read in {read_s:.1f} s)", flush=True)

    results = {"read_s": read_s, "runs": []}
    if not args.skip_baseline:
        print("[bench] single process ...", flush=True)
        results["runs"].append(run_single_process(rows, args, qa_config))
    with benchlib.local_ray(args.cpus):
        for run in range(1, args.runs + 1):
            print(f"[bench] Ray Data run {run} ...", flush=True)
            results["runs"].append(run_ray_data(rows, args, qa_config, run))

    ray_runs = [r for r in results["runs"] if r["method"].startswith("Ray Data")]
    best = max(ray_runs, key=lambda r: r["examples_per_s"])
    ratios = {"ray_data_best_examples_per_s": round(best["examples_per_s"], 1)}
    if not args.skip_baseline:
        ratios["ray_data_best_vs_single_process"] = benchlib.ratio(best["examples_per_s"], results["runs"][0]["examples_per_s"])
    ratios["projected_88k_questions_s"] = round(87_599 / best["examples_per_s"], 1)
    benchlib.print_table("Ratios", [{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    benchlib.print_table("Preprocessing: questions -> training windows", results["runs"],
                         ["method", "run", "concurrency", "examples", "features", "seconds", "examples_per_s",
                          "features_per_s", "load_average"])
    settings = {key: (benchlib.data_label(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    settings["tokenizer"] = benchlib.data_label(Path(args.tokenizer)) if Path(args.tokenizer).exists() else args.tokenizer
    settings.pop("out")
    benchlib.write_json(args.out, "preprocess", ratios, results, settings, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
