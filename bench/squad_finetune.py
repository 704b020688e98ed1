"""Fine-tune a QA model on a whole SQuAD-format training set and evaluate it on all of dev, in one process.

    python -m bench.squad_finetune --model DIR --train TRAIN.json.gz --dev DEV.json.gz --gpu

The GPU suite's accuracy step. It runs train_job's recipe (``train_job.optim``: AdamW, linear
warm-up and decay, the same ``train_step``; length-grouped batches with the padding trimmed; bf16
autocast on the GPU) and the serving code path's evaluation (``qa_common.predict_logits`` and
``decode_predictions``), without Ray: the GPU machine gets only what is carried, and Ray's bundle
and the MiniLM weights do not fit in one carry together. ``python -m train_job`` is the way to train
on a cluster; this is a measurement.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from bench import benchlib, models
from qa_common import QAConfig
from qa_common.config import add_dataclass_flags, given_flags

DEFAULT_OUT = benchlib.RESULTS / "squad_finetune.json"
GROUP_BATCHES = 32  # batches per length-sorted group, as train_job's loop


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.squad_finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory to fine-tune")
    parser.add_argument("--train", type=Path, required=True, help="SQuAD-format training file")
    parser.add_argument("--dev", type=Path, required=True, help="SQuAD-format evaluation file (all of it is scored)")
    parser.add_argument("--gpu", action="store_true", help="on the GPU with bf16 autocast")
    parser.add_argument("--epochs", type=int, default=1, help="(default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="training windows per step (default: %(default)s)")
    parser.add_argument("--eval-batch-size", type=int, default=512, help="(default: %(default)s)")
    parser.add_argument("--max-train-samples", type=int, default=None, help="only the first N training questions")
    parser.add_argument("--max-eval-samples", type=int, default=None, help="only the first N dev questions")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file (default: %(default)s)")
    add_dataclass_flags(parser, QAConfig)
    args = parser.parse_args(argv)
    args.qa = QAConfig(**given_flags(args, QAConfig))
    return args


def main(argv=None) -> int:
    return benchlib.run_in_workdir(measure, parse_args(argv), prefix="bench-squad-")


def measure(args, workdir: Path, load_before: list[float]) -> int:
    import torch

    from bench.train_recipes import training_features
    from qa_common import (
        decode_predictions, length_grouped_batches, load_model_and_tokenizer, predict_logits, prepare_eval_features,
        read_squad, squad_metrics, trim_padding,
    )
    from train_job.optim import build_optimizer, build_scheduler, train_step

    device = torch.device("cuda" if args.gpu else "cpu")
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
    model.to(device)
    clock = benchlib.Stopwatch()
    train_records = read_squad(args.train)[: args.max_train_samples]
    dev_records = read_squad(args.dev)[: args.max_eval_samples]
    features = training_features(train_records, tokenizer, args.qa)
    names = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions")
    features = {name: np.asarray(features[name]) for name in names if name in features}
    prepare_s = clock()
    count = len(features["input_ids"])
    steps_per_epoch = -(-count // args.batch_size)
    optimizer = build_optimizer(model, learning_rate=args.learning_rate, weight_decay=0.01)
    scheduler = build_scheduler(optimizer, warmup_steps=int(0.1 * steps_per_epoch * args.epochs),
                                total_steps=steps_per_epoch * args.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.gpu)
    print(f"[bench] {len(train_records)} questions -> {count} windows, prepared in {prepare_s:.1f} s", flush=True)
    model.train()
    clock = benchlib.Stopwatch()
    for epoch in range(args.epochs):
        rng = np.random.default_rng(epoch)
        order = rng.permutation(count)
        group = GROUP_BATCHES * args.batch_size
        groups = ({name: values[order[i : i + group]] for name, values in features.items()} for i in range(0, count, group))
        for batch in length_grouped_batches(groups, args.batch_size, rng):
            inputs = {name: torch.as_tensor(values, dtype=torch.long, device=device)
                      for name, values in trim_padding(batch).items()}
            loss = train_step(model, inputs, optimizer=optimizer, scheduler=scheduler, scaler=scaler, autocast=autocast)
        print(f"[bench] epoch {epoch + 1}: loss {loss.item():.3f}, {clock():.1f} s", flush=True)
    if args.gpu:
        torch.cuda.synchronize()
    train_s = clock()
    model.eval()
    clock = benchlib.Stopwatch()
    eval_features = prepare_eval_features([str(i) for i in range(len(dev_records))], [r["question"] for r in dev_records],
                                          [r["context"] for r in dev_records], tokenizer, args.qa)
    with autocast:
        start, end = predict_logits(model, eval_features, batch_size=args.eval_batch_size)
    decoded = decode_predictions(eval_features["example_id"], start, end, eval_features["offset_mapping"],
                                 {str(i): r["context"] for i, r in enumerate(dev_records)}, args.qa)
    metrics = squad_metrics({r["id"]: decoded[str(i)]["answer"] for i, r in enumerate(dev_records)},
                            {r["id"]: r["answers"]["text"] for r in dev_records})
    eval_s = clock()
    ratios = {"exact_match": round(metrics["exact_match"], 2), "f1": round(metrics["f1"], 2),
              "train_windows_per_s": round(count * args.epochs / train_s, 1), "train_s": round(train_s, 1),
              "eval_s": round(eval_s, 1), "prepare_s": round(prepare_s, 1)}
    benchlib.print_table("Ratios", [{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    settings = {key: (benchlib.data_label(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    settings.update(qa=args.qa.to_dict(), train_questions=len(train_records), train_windows=count,
                    dev_questions=len(dev_records), model_shape=models.model_summary(args.model))
    settings.pop("out")
    benchlib.write_json(args.out, "squad_finetune", ratios, {"metrics": metrics}, settings, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
