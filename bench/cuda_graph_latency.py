"""Single-question latency in one process: eager PyTorch against CUDA graphs with padded length buckets.

    python -m bench.cuda_graph_latency --gpu      # bert-base shape, bf16, one GPU
    python -m bench.cuda_graph_latency            # CPU check of the code path: tiny model, compile backend "eager"

Each question goes through ``qa_common.answer_questions`` alone (tokenise, forward, decode), as a
lone user's request does in serve_app. The compiled variant is a runner that pads every batch up to
one of a few (windows, tokens) buckets and runs ``torch.compile(model, mode="reduce-overhead")``
(CUDA graphs: one captured graph per bucket, replayed without per-kernel launch cost); a batch larger
than every bucket runs eagerly. Reports p50/p99 per variant after every bucket has been compiled, and
whether the answers agree.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from bench import benchlib, models
from qa_common import QAConfig
from qa_common.config import add_dataclass_flags, given_flags

DEFAULT_OUT = benchlib.RESULTS / "cuda_graph_latency.json"


class BucketedRunner:
    """Pads each batch to the smallest (windows, tokens) bucket that holds it and runs ``compiled`` on it.

    A compiled model sees only the bucket shapes, so CUDA graphs are captured once per bucket; padded
    positions have attention mask 0, and their logits are cut off again.
    """

    def __init__(self, compiled, eager, *, lengths: tuple[int, ...], batch_sizes: tuple[int, ...]):
        self.compiled, self.eager = compiled, eager
        self.lengths, self.batch_sizes = sorted(lengths), sorted(batch_sizes)
        self.input_names, self.on_cpu = eager.input_names, eager.on_cpu
        self.length_multiple = 1  # it pads to its own buckets

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        rows, width = batch["input_ids"].shape
        length = next((size for size in self.lengths if size >= width), None)
        size = next((size for size in self.batch_sizes if size >= rows), None)
        if length is None or size is None:
            return self.eager(batch)
        padded = {name: np.zeros((size, length), dtype=np.int64) for name in batch}
        for name, values in batch.items():
            padded[name][:rows, :width] = values
        start, end = self.compiled(padded)
        return start[:rows, :width], end[:rows, :width]

    def warm_up(self) -> None:
        """Compile (capture) every bucket before timing."""
        for size in self.batch_sizes:
            for length in self.lengths:
                shape = (size, length)
                self.compiled({"input_ids": np.ones(shape, dtype=np.int64), "attention_mask": np.ones(shape, dtype=np.int64),
                               "token_type_ids": np.zeros(shape, dtype=np.int64)})


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cuda_graph_latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="on the GPU, bf16, compile mode reduce-overhead")
    parser.add_argument("--model", help=f"{models.MODEL_HELP} (default: bert-base with --gpu, bert-tiny on CPU)")
    parser.add_argument("--data", type=Path, default=None, help="questions (default: bench.serve_load's)")
    parser.add_argument("--questions", type=int, default=200, help="timed questions per variant (default: %(default)s)")
    parser.add_argument("--lengths", default="128,256,384", help="token buckets (default: %(default)s)")
    parser.add_argument("--batch-sizes", default="1,2", help="window buckets (default: %(default)s)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default: inductor with --gpu; eager on CPU, which only checks the path)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file (default: %(default)s)")
    add_dataclass_flags(parser, QAConfig, defaults={f: "the model's qa_config.json" for f in QAConfig.__dataclass_fields__})
    args = parser.parse_args(argv)
    args.model = args.model or ("bert-base" if args.gpu else "bert-tiny")
    args.data = args.data or benchlib.default_eval_data()
    args.compile_backend = args.compile_backend or ("inductor" if args.gpu else "eager")
    args.lengths = tuple(int(v) for v in args.lengths.split(","))
    args.batch_sizes = tuple(int(v) for v in args.batch_sizes.split(","))
    args.qa = given_flags(args, QAConfig)
    return args


def time_questions(runner, tokenizer, questions, config) -> tuple[list[float], list[dict]]:
    import torch

    from qa_common import answer_questions

    latencies, answers = [], []
    for question in questions:
        clock = benchlib.Stopwatch()
        [found] = answer_questions(runner, tokenizer, [question], config)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        latencies.append(clock())
        answers.append(found[0])
    return latencies, answers


def main(argv=None) -> int:
    return benchlib.run_in_workdir(measure, parse_args(argv), prefix="bench-cuda-graph-")


def measure(args, workdir: Path, load_before: list[float]) -> int:
    import torch

    from qa_common import Question, load_qa_config, read_squad
    from qa_common.backends import load_runner

    device = "cuda" if args.gpu else "cpu"
    model_dir = models.prepare_model_dir(args.model, workdir / "model")
    eager, tokenizer, _ = load_runner(model_dir, "torch", device=device,
                                      dtype=torch.bfloat16 if args.gpu else torch.float32)
    config = load_qa_config(model_dir, **args.qa)
    if max(args.lengths) < config.max_length:
        raise SystemExit(f"--lengths: the largest bucket ({max(args.lengths)}) must hold a whole window "
                         f"(max_length {config.max_length})")
    records = read_squad(args.data, require_answers=False)
    questions = [Question(records[i % len(records)]["question"], records[i % len(records)]["context"])
                 for i in range(args.questions)]
    mode = "reduce-overhead" if args.gpu else None
    compiled_model = torch.compile(eager.model, mode=mode, backend=args.compile_backend, dynamic=False)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                2 * len(args.lengths) * len(args.batch_sizes))
    from qa_common.inference import TorchRunner

    bucketed = BucketedRunner(TorchRunner(compiled_model), eager, lengths=args.lengths, batch_sizes=args.batch_sizes)
    clock = benchlib.Stopwatch()
    bucketed.warm_up()
    compile_s = clock()
    time_questions(eager, tokenizer, questions[:10], config)  # warm the eager kernels too
    rows, answers = [], {}
    for name, runner in (("eager", eager), ("cuda graphs, buckets" if args.gpu else "compiled, buckets", bucketed)):
        latencies, answers[name] = time_questions(runner, tokenizer, questions, config)
        rows.append({"variant": name, "questions": len(latencies), "p50_ms": 1000 * benchlib.percentile(latencies, 50),
                     "p99_ms": 1000 * benchlib.percentile(latencies, 99), "mean_ms": 1000 * sum(latencies) / len(latencies)})
    eager_answers, compiled_answers = answers.values()
    same = sum((a["start"], a["end"]) == (b["start"], b["end"]) for a, b in zip(eager_answers, compiled_answers))
    ratios = {"eager_vs_compiled_p50": benchlib.ratio(rows[0]["p50_ms"], rows[1]["p50_ms"]),
              "same_answers": f"{same}/{len(questions)}", "compile_s": round(compile_s, 1)}
    benchlib.print_table("Ratios", [{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    benchlib.print_table("Single-question latency in-process", rows, ["variant", "questions", "p50_ms", "p99_ms", "mean_ms"])
    settings = {key: (benchlib.data_label(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    settings.pop("out")
    settings.update(model_shape=models.model_summary(model_dir), device=device)
    benchlib.write_json(args.out, "cuda_graph_latency", ratios, {"variants": rows}, settings, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
