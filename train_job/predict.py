"""``python -m train_job.predict``: answer files of questions with a trained model over a Ray cluster,
and evaluate the answers where the files hold gold answers.

Pipeline: Ray Data reads the questions (:mod:`train_job.predict_data`) -> ``map_batches`` on a pool
of actors, each holding one copy of the model (:class:`BatchAnswerer`: featurise, forward, decode
whole questions, so every window of a question stays in one actor call and nothing is shuffled)
-> the driver streams the answers into ``OUTPUT/predictions.jsonl`` (or ``.parquet``) one block at
a time. With gold answers it also adds up each question's scores (computed in the actors with
:func:`qa_common.metric.question_scores`, summed by :class:`qa_common.metric.MetricTotals`: the
same metrics, keys and numbers as ``python -m qa_common.evaluate`` prints for the same answers) and
writes ``OUTPUT/metrics.json`` and ``OUTPUT/predictions.json`` (``{id: answer}``, what the official
SQuAD script and ``python -m qa_common.evaluate`` read). The driver holds one block at a time and
the question ids seen (a repeated id is an error), never all questions or answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from qa_common import Question, SquadFormatError, answer_questions, load_qa_config
from qa_common.backends import BACKENDS, DEFAULT_MAX_F1_LOSS, ONNX_FILES, load_runner, onnx_file, resolve_backend
from qa_common.inference import CPU_BATCH_TOKENS, FORWARD_BATCH_SIZE, FORWARD_BATCH_SIZE_GPU
from qa_common.metric import V1_NAMES, question_scores
from qa_common.modeling import SERVING_DTYPES, check_model_dir, torch_dtype
from train_job import run_dir
from train_job.cli import at_least
from train_job.predict_data import check_input, question_dataset, resolve_inputs, validate_rows
from train_job.predict_output import (
    ANSWERABLE, DATA_ERROR, FORMATS, SCORE_NAMES, SCORE_PREFIX, OutputWriter, output_directory,
)
from train_job.ray_cluster import ActorPool, add_actor_flags, add_address_flag, connect_ray


class BatchAnswerer:
    """Ray Data UDF, one per actor: a batch of questions -> one row per question with its best answer.

    The row is ``{"id", **answer}``: every key of :func:`qa_common.answer_questions`'s best answer
    (``answer, score, start, end`` and whatever the model adds, such as ``no_answer_probability``).
    With ``with_answers``, each row also carries that question's scores (``gold_*`` columns).
    """

    def __init__(self, model_dir: str, *, backend: str, dtype: str, forward_batch_size: int | None, threads: int,
                 with_answers: bool):
        import ray

        device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.runner, self.tokenizer, _ = load_runner(model_dir, backend, device=device, dtype=torch_dtype(dtype, device),
                                                     threads=threads)
        self.qa_config = load_qa_config(model_dir)
        self.forward_batch_size = forward_batch_size or (FORWARD_BATCH_SIZE_GPU if device == "cuda" else FORWARD_BATCH_SIZE)
        self.with_answers = with_answers

    def __call__(self, batch):
        import pyarrow as pa

        try:
            records = validate_rows(batch.to_pylist())
        except SquadFormatError as error:
            return pa.table({DATA_ERROR: [str(error)]})
        best = answer_questions(self.runner, self.tokenizer, [Question(r["question"], r["context"]) for r in records],
                                self.qa_config, batch_size=self.forward_batch_size)
        rows = []
        for record, answers in zip(records, best):
            row = {"id": record["id"], **answers[0]}
            if self.with_answers:
                golds = record["answers"]["text"]
                scores = question_scores(row["answer"], golds)
                row.update({SCORE_PREFIX + name: scores.get(name, 0.0) for name in SCORE_NAMES},
                           **{ANSWERABLE: bool(golds)})
            rows.append(row)
        return pa.Table.from_pylist(rows)


def prepare(args: argparse.Namespace) -> dict:
    """Everything that can fail on bad input, before any actor starts: the files' first records, the
    model directory, the output directory, whether the actors fit the cluster."""
    inputs = [check_input(path) for path in resolve_inputs(args.data)]
    with_answers = all(f.has_answers for f in inputs)
    if not with_answers and any(f.has_answers for f in inputs):
        print(f"[predict] only {sum(f.has_answers for f in inputs)} of {len(inputs)} files hold gold answers: "
              "answering without metrics (evaluate the annotated files on their own)", file=sys.stderr)
    model_dir = check_model_dir(args.model)
    backend = resolve_backend(model_dir, args.backend, device="cuda" if args.num_gpus_per_actor else "cpu",
                              max_f1_loss=args.max_f1_loss)
    if backend in ONNX_FILES:
        onnx_file(model_dir, backend)  # a missing export fails here, naming the command that writes it
    output = output_directory(args.output)
    connect_ray(args.address)
    return {"inputs": inputs, "with_answers": with_answers, "model_dir": model_dir, "output": output,
            "pool": ActorPool.fit(args), "backend": backend}


def predict(args: argparse.Namespace, plan: dict) -> dict:
    """Answer every question of ``args.data`` into ``args.output``; returns the run's summary."""
    import ray.data

    started = time.perf_counter()
    inputs, pool = plan["inputs"], plan["pool"]
    actors, per_actor = pool.actors, pool.per_actor
    dataset = question_dataset(inputs, with_answers=plan["with_answers"], rows_per_block=args.batch_size)
    answered = dataset.map_batches(
        BatchAnswerer,
        fn_constructor_kwargs={"model_dir": plan["model_dir"], "backend": plan["backend"], "dtype": args.dtype,
                               "forward_batch_size": args.forward_batch_size, "threads": pool.threads,
                               "with_answers": plan["with_answers"]},
        # One call per block (question_dataset cuts blocks of about --batch-size questions): with a batch
        # size, Ray Data would bundle blocks up to it and send the answers of a whole bundle back at once.
        batch_size=None, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
        **per_actor,
    )
    print(f"[predict] {len(inputs)} file(s), {actors} actor(s) with {per_actor['num_cpus']:g} CPU(s) and "
          f"{per_actor['num_gpus']:g} GPU(s) each; model {plan['model_dir']}, backend {plan['backend']}", flush=True)
    writer = OutputWriter(*plan["output"], args.format, plan["with_answers"])
    first_block = None  # (seconds, questions) when the first answers arrived: start-up is over
    try:
        for block in answered.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.write(block)
            first_block = first_block or (time.perf_counter() - started, writer.questions)
    except BaseException:
        writer.close()
        writer.discard()
        raise
    writer.close()
    seconds = time.perf_counter() - started
    summary = {"questions": writer.questions, "seconds": round(seconds, 2),
               "questions_per_s": round(writer.questions / seconds, 2), "actors": actors, "backend": plan["backend"],
               "predictions": writer.location(f"predictions.{args.format}")}
    if first_block and writer.questions > first_block[1]:
        summary["first_answers_s"] = round(first_block[0], 2)
        summary["questions_per_s_after_first_answers"] = round(
            (writer.questions - first_block[1]) / (seconds - first_block[0]), 2)
    print(f"[predict] {writer.questions} questions answered in {seconds:.1f} s ({writer.questions / seconds:.1f}/s; "
          f"first answers after {summary.get('first_answers_s', seconds):.1f} s) -> {summary['predictions']}", flush=True)
    if plan["with_answers"]:
        metrics = {**writer.metrics(), "model": plan["model_dir"], "data": [f.path for f in inputs], **summary}
        with writer.filesystem.open_output_stream(writer.location(run_dir.METRICS)) as stream:
            stream.write((json.dumps(metrics, indent=2) + "\n").encode("utf-8"))
        print_metrics(metrics)
        summary["metrics"] = metrics
    return summary


def print_metrics(metrics: dict) -> None:
    if "exact_match" in metrics:
        print("\n" + "  ".join(f"{name} {metrics[name]:.2f}" for name in V1_NAMES) + f"  ({metrics['total']} questions)")
    else:
        for group, label in (("", "all questions"), ("HasAns_", "answerable"), ("NoAns_", "unanswerable")):
            if f"{group}total" in metrics:
                print(f"{label:<16}{metrics[group + 'total']:>8}  exact {metrics[group + 'exact']:6.2f}  "
                      f"F1 {metrics[group + 'f1']:6.2f}")
    print(flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train_job.predict",
        description="Answer the questions of SQuAD-format files (or JSONL/Parquet of id, question, context) "
        "with a trained model on a pool of Ray actors; with gold answers, also evaluate (EM/F1).",
    )
    parser.add_argument("--model", required=True, help="model directory (python -m train_job's OUTPUT_DIR/model)")
    parser.add_argument("--data", required=True, nargs="+", metavar="FILE_OR_GLOB",
                        help="data files, globs, directories or URIs (s3://, gs://): .json, .jsonl, .parquet, .gz")
    parser.add_argument("--output", required=True, help="output directory (or URI) for predictions and metrics")
    parser.add_argument("--format", choices=FORMATS, default="jsonl", help="predictions file format (default: jsonl)")
    add_actor_flags(parser, "model actors", gpus=True)
    parser.add_argument("--batch-size", type=at_least(1), default=256, help="questions per actor call (default: 256)")
    parser.add_argument("--forward-batch-size", type=at_least(1), default=None,
                        help=f"windows per forward pass (default: {FORWARD_BATCH_SIZE} on CPU, {FORWARD_BATCH_SIZE_GPU} on GPU); "
                             f"on a CPU a pass also holds at most {CPU_BATCH_TOKENS} tokens")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="torch, onnx, onnx-int8 (files written by python -m qa_common.export_onnx) or auto "
                        "(default): on CPU the fastest exported backend within --max-f1-loss of PyTorch's F1, else "
                        "torch; on a GPU torch")
    parser.add_argument("--max-f1-loss", type=float, default=DEFAULT_MAX_F1_LOSS,
                        help=f"F1 points below PyTorch that --backend auto accepts for speed (default: {DEFAULT_MAX_F1_LOSS:g})")
    parser.add_argument("--dtype", choices=SERVING_DTYPES, default="auto",
                        help="PyTorch weights (default: auto, bfloat16 on GPU and float32 on CPU)")
    add_address_flag(parser)
    args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plan = prepare(args)
    except (SquadFormatError, FileNotFoundError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        predict(args, plan)
    except SquadFormatError as error:  # a bad record past the first ones, found by an actor
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
