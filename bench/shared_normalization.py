"""What shared normalisation costs per window: the same batches of whole questions, trained with the
per-window loss and with the shared one, in one process.

    python -m bench.shared_normalization --model runs/squad-minilm/model --data runs/library-mined/train.json

``--data`` is ``python -m library_job mine``'s train.json (questions grouped with their read
passages). Its first ``--questions`` groups are featurised as ``train_job`` featurises them (the
squad-minilm-library preset's windows), cut into batches of whole questions as the loop cuts them
(``train_job.data.training_units`` + ``epoch_batches``), and ``train_job.optim.train_step`` runs
over them with the batch's ``group`` column (shared: ``train_job/loss.py``) and without it (per
window, BERT's loss) in alternating blocks of ``--block`` steps, so drift in the machine's speed
falls on both alike. The first block of each is a warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from bench import benchlib

DEFAULT_OUT = benchlib.RESULTS / "shared_normalization.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.shared_normalization", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="reader model directory")
    parser.add_argument("--data", type=Path, required=True, help="`python -m library_job mine`'s train.json")
    parser.add_argument("--questions", type=int, default=240, help="groups featurised (default: 240)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per batch on average (default: 16)")
    parser.add_argument("--block", type=int, default=10, help="steps per timed block (default: 10)")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks of each loss (default: 3)")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads (default: 2)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from qa_common import load_model_and_tokenizer, prepare_train_features, read_squad
    from train_job.presets import PRESETS
    from train_job.data import epoch_batches, training_units
    from train_job.loop import GROUP_BATCHES, training_batch
    from train_job.optim import build_optimizer, build_scheduler, resolve_precision, train_step
    from qa_common import QAConfig

    load_before = benchlib.load_average()
    torch.set_num_threads(args.threads)
    records = read_squad(args.data)
    groups = list(dict.fromkeys(r["group"] for r in records))[: args.questions]
    index = {group: i for i, group in enumerate(groups)}
    records = [r for r in records if r["group"] in index]
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
    qa = QAConfig(**PRESETS["squad-minilm-library"]["qa"])
    features = prepare_train_features(
        [r["question"] for r in records], [r["context"] for r in records],
        [(r["answers"]["answer_start"] or [0])[0] for r in records], [(r["answers"]["text"] or [""])[0] for r in records],
        tokenizer, qa, groups=[index[r["group"]] for r in records])
    units = training_units(features, args.batch_size)
    batches = epoch_batches(np.random.default_rng(0).permutation(len(units)), units.lengths, units.per_batch,
                            np.random.default_rng(1), GROUP_BATCHES)
    precision = resolve_precision("auto", torch.device("cpu"))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    optimizer = build_optimizer(model, learning_rate=1e-5, weight_decay=0.01)
    scheduler = build_scheduler(optimizer, warmup_steps=0, total_steps=10**6)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model.train()

    def block(steps: list[np.ndarray], shared: bool) -> tuple[int, float]:
        windows, started = 0, time.perf_counter()
        for batch_units in steps:
            rows = units.windows(batch_units)
            batch = {name: values for name, values in training_batch(features, rows).items()  # as the loop builds it
                     if shared or name != "group"}
            train_step(model, batch, optimizer=optimizer, scheduler=scheduler, scaler=scaler, autocast=autocast)
            windows += len(rows)
        return windows, time.perf_counter() - started

    totals = {"per_window": [0, 0.0], "shared": [0, 0.0]}
    needed = 2 * args.block * (args.blocks + 1)
    if len(batches) < needed:
        print(f"error: {len(batches)} batches from {len(groups)} questions; --questions must give {needed}",
              file=sys.stderr)
        return 2
    for b in range(args.blocks + 1):
        for k, name in enumerate(("per_window", "shared") if b % 2 == 0 else ("shared", "per_window")):
            start = (2 * b + k) * args.block
            windows, seconds = block(batches[start : start + args.block], name == "shared")
            if b > 0:  # the first block of each is the warm-up
                totals[name][0] += windows
                totals[name][1] += seconds
    results = {name: {"windows": w, "seconds": round(s, 2), "windows_per_s": round(w / s, 2)}
               for name, (w, s) in totals.items()}
    ratios = {"shared_vs_per_window_windows_per_s": benchlib.ratio(results["shared"]["windows_per_s"],
                                                                    results["per_window"]["windows_per_s"])}
    settings = {"model": args.model, "data": str(args.data), "questions": len(groups), "windows": len(features["input_ids"]), "questions_per_batch": units.per_batch,
                "block": args.block, "blocks": args.blocks, "threads": args.threads, "precision": precision}
    benchlib.print_table("shared normalisation vs per-window loss", [{"loss": k, **v} for k, v in results.items()],
                         ["loss", "windows", "seconds", "windows_per_s"])
    benchlib.write_json(args.out, "shared_normalization", ratios, results, settings, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
