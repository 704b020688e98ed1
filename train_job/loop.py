"""The training loop that runs on every Ray Train worker: plain PyTorch around qa_common."""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from qa_common import (
    decode_predictions, length_grouped_batches, load_model_and_tokenizer, predict_logits, score_answer, trim_padding,
)
from train_job.config import TrainConfig

TRAINING_STATE = "training_state.pt"
PREDICTIONS = "predictions.json"
HISTORY = "history.json"
GROUP_BATCHES = 32  # length grouping sorts this many batches' worth of features at a time
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def train_loop_per_worker(loop_config: dict) -> None:
    config = TrainConfig(**loop_config["train_config"])
    steps_per_epoch = loop_config["steps_per_epoch"]
    validation_records = ray.get(loop_config["validation_records"])
    rank, world_size = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)
    worker_node_ids = gather_objects(ray.get_runtime_context().get_node_id(), world_size)

    resumed_from = ray.train.get_checkpoint()
    state = {"epoch": 0, "step": 0, "train_runtime_s": 0.0, "train_features_seen": 0, "history": []}
    if resumed_from:
        with resumed_from.as_directory() as directory:
            model, tokenizer = load_model_and_tokenizer(str(Path(directory) / "model"))
            state = torch.load(Path(directory) / TRAINING_STATE, weights_only=False)
        log(rank, f"resumed from the checkpoint of epoch {state['epoch']} (step {state['step']})")
    else:
        model, tokenizer = load_model_and_tokenizer(config.model)
    model = ray.train.torch.prepare_model(model)
    if config.compile:
        # Trimmed batches change length every step: compile for dynamic shapes once, not per length.
        model = torch.compile(model, dynamic=True)

    decay = [p for n, p in model.named_parameters() if not n.endswith("bias") and "LayerNorm" not in n]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate, fused=device.type == "cuda",
    )
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / max(warmup_steps, 1), max(0.0, (total_steps - step) / max(total_steps - warmup_steps, 1))),
    )
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    if resumed_from:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
    autocast = torch.autocast(
        device.type, dtype=AUTOCAST_DTYPES.get(config.precision), enabled=config.precision in AUTOCAST_DTYPES
    )
    train_shard = ray.train.get_dataset_shard(f"train_{rank}")
    validation_features = ray.train.get_dataset_shard("validation")

    for epoch in range(state["epoch"], config.epochs):
        model.train()
        started, features_seen, step_in_epoch = time.perf_counter(), 0, 0
        loss_sum = torch.zeros((), device=device)
        batches = training_batches(train_shard, config, epoch, device)
        # Shards differ by at most one feature, so workers may take different numbers of steps; DDP's
        # join lets the workers that finish first take part in the others' gradient all-reduce.
        with model.join() if world_size > 1 else contextlib.nullcontext():
            for step_in_epoch, batch in enumerate(batches, start=1):
                with autocast:
                    loss = model(**batch).loss
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                # The norm of the all-reduced gradients is the same on every worker, so all stop together.
                if not scaler.is_enabled() and not torch.isfinite(grad_norm):
                    raise FloatingPointError(
                        f"training diverged at epoch {epoch + 1} step {step_in_epoch}: loss {loss.item():.4g}, "
                        f"gradient norm {grad_norm.item():.4g}; lower the learning rate ({config.learning_rate:g})"
                    )
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                features_seen += len(batch["input_ids"])
                state["step"] += 1
                if rank == 0 and (step_in_epoch % max(1, steps_per_epoch // 10) == 0 or step_in_epoch == steps_per_epoch):
                    elapsed = time.perf_counter() - started
                    log(rank, f"epoch {epoch + 1}/{config.epochs} step {step_in_epoch}/{steps_per_epoch} "
                              f"loss {loss.item():.4f} lr {scheduler.get_last_lr()[0]:.3g} "
                              f"{features_seen * world_size / elapsed:.1f} features/s")
        epoch_seconds = time.perf_counter() - started
        totals = all_reduce_sum(torch.tensor([features_seen, loss_sum.item(), step_in_epoch], device=device))
        state["train_runtime_s"] += epoch_seconds
        state["train_features_seen"] += int(totals[0])

        predictions, scores = evaluate(model, validation_features, validation_records, config, autocast, rank, world_size)
        metrics = {
            "epoch": epoch + 1,
            "step": state["step"],
            "train_loss": float(totals[1] / totals[2]),
            "train_features_seen": state["train_features_seen"],
            "train_samples_per_second": float(totals[0]) / epoch_seconds,
            "train_runtime_s": state["train_runtime_s"],
            "worker_node_ids": worker_node_ids,
            **scores,
        }
        log(rank, "epoch {epoch} done: loss {train_loss:.4f}, EM {exact_match:.2f}, F1 {f1:.2f}, "
                  "{train_samples_per_second:.1f} features/s".format(**metrics))
        state["epoch"] = epoch + 1
        state["history"].append(metrics)
        report_with_checkpoint(metrics, model, tokenizer, optimizer, scheduler, scaler, state, predictions, rank)
        if loop_config.get("fault_after_epoch") == epoch + 1 and not resumed_from:
            raise RuntimeError(f"injected fault after epoch {epoch + 1} (TRAIN_JOB_FAULT_AFTER_EPOCH)")


def training_batches(train_shard, config: TrainConfig, epoch: int, device):
    """Shuffled training batches, padding trimmed; length-grouped unless turned off."""
    group = GROUP_BATCHES if config.group_by_length else 1
    batches = train_shard.iter_batches(
        batch_size=group * config.per_device_batch_size, batch_format="numpy",
        local_shuffle_buffer_size=4 * group * config.per_device_batch_size, local_shuffle_seed=config.seed + epoch,
    )
    if config.group_by_length:
        batches = length_grouped_batches(batches, config.per_device_batch_size, np.random.default_rng(config.seed + epoch))
    for batch in batches:
        yield {name: torch.as_tensor(values, dtype=torch.long, device=device)
               for name, values in trim_padding(batch).items()}


def evaluate(model, validation_features, validation_records, config, autocast, rank, world_size):
    """EM/F1/precision/recall over every validation question; each worker takes every n-th question.

    All windows of one question go to the same worker, which decodes them together; the sums are
    then added up across workers and the predictions gathered.
    """
    model.eval()
    kept = {"example_index": [], "offset_mapping": [], "start_logits": [], "end_logits": []}
    for batch in validation_features.iter_batches(batch_size=config.eval_batch_size, batch_format="numpy"):
        mine = batch["example_index"] % world_size == rank
        if not mine.any():
            continue
        batch = {name: values[mine] for name, values in batch.items()}
        with autocast:
            start_logits, end_logits = predict_logits(model, batch, batch_size=config.eval_batch_size)
        kept["example_index"].append(batch["example_index"])
        kept["offset_mapping"].append(batch["offset_mapping"])
        kept["start_logits"].append(start_logits)
        kept["end_logits"].append(end_logits)
    my_indices = range(rank, len(validation_records), world_size)
    contexts = {i: validation_records[i]["context"] for i in my_indices}
    if kept["example_index"]:
        arrays = {name: np.concatenate(values) for name, values in kept.items()}
        decoded = decode_predictions(
            arrays["example_index"], arrays["start_logits"], arrays["end_logits"], arrays["offset_mapping"],
            contexts, n_best=config.qa_config().n_best, max_answer_length=config.max_answer_length,
        )
    else:
        decoded = {i: {"answer": ""} for i in contexts}
    sums = Counter()
    for i, answer in decoded.items():
        sums.update(score_answer(answer["answer"], validation_records[i]["answers"]["text"]))
    names = ["exact_match", "f1", "precision", "recall"]
    totals = all_reduce_sum(torch.tensor([sums[n] for n in names], dtype=torch.float64))
    scores = {name: 100.0 * float(total) / len(validation_records) for name, total in zip(names, totals)}
    predictions = {validation_records[i]["id"]: answer["answer"] for i, answer in decoded.items()}
    predictions = {k: v for part in gather_objects(predictions, world_size) for k, v in part.items()}
    return predictions, scores


def report_with_checkpoint(metrics, model, tokenizer, optimizer, scheduler, scaler, state, predictions, rank):
    """Every worker reports (a barrier); rank 0 attaches the checkpoint: HF model dir + optimiser state."""
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            getattr(model, "module", model).save_pretrained(Path(directory) / "model")
            tokenizer.save_pretrained(Path(directory) / "model")
            torch.save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict()}, Path(directory) / TRAINING_STATE)
            (Path(directory) / PREDICTIONS).write_text(json.dumps(predictions, ensure_ascii=False), encoding="utf-8")
            (Path(directory) / HISTORY).write_text(json.dumps(state["history"]), encoding="utf-8")
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)


def gather_objects(value, world_size: int) -> list:
    """``value`` of every worker, in rank order."""
    if world_size == 1:
        return [value]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device_values = values.to(ray.train.torch.get_device()) if dist.get_backend() == "nccl" else values.cpu()
        dist.all_reduce(device_values)
        return device_values.cpu()
    return values.cpu()


def log(rank: int, message: str) -> None:
    if rank == 0:
        print(f"[train_job] {message}", flush=True)


def steps_per_epoch(train_features: int, num_workers: int, batch_size: int) -> int:
    """Steps of the worker with the largest shard (shards differ by at most one feature)."""
    return max(1, math.ceil(math.ceil(train_features / num_workers) / batch_size))
