"""The training loop that runs on every Ray Train worker: plain PyTorch around qa_common.

``train_loop_per_worker`` reads as: set up, then for each epoch train, evaluate and report a
checkpoint. The optimiser, schedule and step are in ``train_job.optim``; the checkpoint layout in
``train_job.checkpoint``.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from qa_common import (
    NO_ANSWER, decode_predictions, evaluate_answers, length_grouped_batches, load_model_and_tokenizer, predict_logits,
    trim_padding,
)
from train_job import checkpoint
from train_job.config import TrainConfig
from train_job.optim import build_optimizer, build_scheduler, train_step

GROUP_BATCHES = 32  # length grouping sorts this many batches' worth of features at a time
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Worker:
    """What one worker holds for the whole run."""

    config: TrainConfig
    rank: int
    world_size: int
    device: torch.device
    model: torch.nn.Module  # wrapped for DDP (and compiled) when that applies
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    autocast: torch.autocast
    state: dict  # counters and history, saved with every checkpoint
    resumed: bool


def train_loop_per_worker(loop_config: dict) -> None:
    config = TrainConfig.from_dict(loop_config["train_config"])
    worker = set_up(config, loop_config["steps_per_epoch"])
    validation_records = ray.get(loop_config["validation_records"])
    worker_node_ids = gather_objects(ray.get_runtime_context().get_node_id(), worker.world_size)
    train_shard = ray.train.get_dataset_shard(f"train_{worker.rank}")
    validation_features = ray.train.get_dataset_shard("validation")
    after_epoch = loop_config.get("after_epoch")  # a test seam: called after each epoch's report

    for epoch in range(worker.state["epoch"], config.epochs):
        train_metrics = train_epoch(worker, train_shard, epoch, loop_config["steps_per_epoch"])
        predictions, scores = evaluate(worker, validation_features, validation_records)
        metrics = {"epoch": epoch + 1, **train_metrics, "worker_node_ids": worker_node_ids, **scores}
        log(worker.rank, "epoch {epoch} done: loss {train_loss:.4f}, {scores}, {train_samples_per_second:.1f} features/s"
            .format(**metrics, scores=describe_scores(scores)))
        worker.state["epoch"] = epoch + 1
        worker.state["history"].append(metrics)
        report_with_checkpoint(worker, metrics, predictions)
        if after_epoch is not None:
            after_epoch(epoch + 1, resumed=worker.resumed)


def set_up(config: TrainConfig, steps_per_epoch: int) -> Worker:
    """Model, optimiser and schedule, from the last checkpoint when Ray Train restarts a failed run."""
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)
    resumed_from = ray.train.get_checkpoint()
    state = {"epoch": 0, "step": 0, "train_runtime_s": 0.0, "train_features_seen": 0, "history": []}
    if resumed_from:
        with resumed_from.as_directory() as directory:
            model, tokenizer = load_model_and_tokenizer(str(checkpoint.model_dir(directory)))
            state = checkpoint.read_training_state(directory)
        log(rank, f"resumed from the checkpoint of epoch {state['epoch']} (step {state['step']})")
    else:
        model, tokenizer = load_model_and_tokenizer(config.model)
    model = ray.train.torch.prepare_model(model)
    if config.compile:
        # Trimmed batches change length every step: compile for dynamic shapes once, not per length.
        model = torch.compile(model, dynamic=True)

    optimizer = build_optimizer(model, learning_rate=config.learning_rate, weight_decay=config.weight_decay)
    total_steps = steps_per_epoch * config.epochs
    scheduler = build_scheduler(optimizer, warmup_steps=int(config.warmup_ratio * total_steps), total_steps=total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    if resumed_from:
        optimizer.load_state_dict(state.pop("optimizer"))
        scheduler.load_state_dict(state.pop("scheduler"))
        scaler.load_state_dict(state.pop("scaler"))
    autocast = torch.autocast(
        device.type, dtype=AUTOCAST_DTYPES.get(config.precision), enabled=config.precision in AUTOCAST_DTYPES
    )
    return Worker(config, rank, world_size, device, model, tokenizer, optimizer, scheduler, scaler, autocast, state,
                  resumed=bool(resumed_from))


def train_epoch(worker: Worker, train_shard, epoch: int, steps_per_epoch: int) -> dict:
    """One pass over this worker's shard; returns the epoch's training metrics, summed over workers."""
    config, state = worker.config, worker.state
    worker.model.train()
    started, features_seen, step_in_epoch = time.perf_counter(), 0, 0
    loss_sum = torch.zeros((), device=worker.device)
    # Shards differ by at most one feature, so workers may take different numbers of steps; DDP's
    # join lets the workers that finish first take part in the others' gradient all-reduce.
    with worker.model.join() if worker.world_size > 1 else contextlib.nullcontext():
        for step_in_epoch, batch in enumerate(training_batches(train_shard, config, epoch, worker.device), start=1):
            try:
                loss = train_step(worker.model, batch, optimizer=worker.optimizer, scheduler=worker.scheduler,
                                  scaler=worker.scaler, autocast=worker.autocast)
            except FloatingPointError as error:
                raise FloatingPointError(
                    f"training diverged at epoch {epoch + 1} step {step_in_epoch}: {error}; "
                    f"lower the learning rate ({config.learning_rate:g})"
                ) from None
            loss_sum += loss
            features_seen += len(batch["input_ids"])
            state["step"] += 1
            if step_in_epoch % max(1, steps_per_epoch // 10) == 0 or step_in_epoch == steps_per_epoch:
                log(worker.rank, f"epoch {epoch + 1}/{config.epochs} step {step_in_epoch}/{steps_per_epoch} "
                                 f"loss {loss.item():.4f} lr {worker.scheduler.get_last_lr()[0]:.3g} "
                                 f"{features_seen * worker.world_size / (time.perf_counter() - started):.1f} features/s")
    epoch_seconds = time.perf_counter() - started
    totals = all_reduce_sum(torch.tensor([features_seen, loss_sum.item(), step_in_epoch], device=worker.device))
    state["train_runtime_s"] += epoch_seconds
    state["train_features_seen"] += int(totals[0])
    return {
        "step": state["step"],
        "train_loss": float(totals[1] / totals[2]),
        "train_features_seen": state["train_features_seen"],
        "train_samples_per_second": float(totals[0]) / epoch_seconds,
        "train_runtime_s": state["train_runtime_s"],
    }


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


def evaluate(worker: Worker, validation_features, validation_records):
    """The metrics over every validation question (:func:`qa_common.evaluate_answers`); each worker
    decodes every n-th question.

    All windows of one question go to the same worker, which decodes them together (the best span
    and its no-answer probability); the answers are then gathered and every worker computes the
    same metrics: SQuAD 1.1's, or SQuAD 2.0's (with the chosen no-answer threshold) for v2 data or
    a model that abstains. The forwards go through the unwrapped model: DDP's forward is a
    collective (it broadcasts buffers), and workers run different numbers of evaluation forwards.
    """
    config, rank, world_size = worker.config, worker.rank, worker.world_size
    model = getattr(worker.model, "module", worker.model)
    model.eval()
    kept = {"example_index": [], "offset_mapping": [], "start_logits": [], "end_logits": []}
    for batch in validation_features.iter_batches(batch_size=config.eval_batch_size, batch_format="numpy"):
        mine = batch["example_index"] % world_size == rank
        if not mine.any():
            continue
        batch = {name: values[mine] for name, values in batch.items()}
        with worker.autocast:
            start_logits, end_logits = predict_logits(model, batch, batch_size=config.eval_batch_size)
        kept["example_index"].append(batch["example_index"])
        kept["offset_mapping"].append(batch["offset_mapping"])
        kept["start_logits"].append(start_logits)
        kept["end_logits"].append(end_logits)
    my_indices = range(rank, len(validation_records), world_size)
    contexts = {i: validation_records[i]["context"] for i in my_indices}
    if kept["example_index"]:
        arrays = {name: np.concatenate(values) for name, values in kept.items()}
        # The best span even where the model would abstain: the threshold is chosen afterwards.
        decoded = decode_predictions(
            arrays["example_index"], arrays["start_logits"], arrays["end_logits"], arrays["offset_mapping"],
            contexts, config.qa.replace(version_2_with_negative=False),
        )
    else:
        decoded = {i: dict(NO_ANSWER) for i in contexts}
    answers = {validation_records[i]["id"]: answer for i, answer in decoded.items()}
    answers = {k: v for part in gather_objects(answers, world_size) for k, v in part.items()}
    references = {record["id"]: record["answers"]["text"] for record in validation_records}
    return evaluate_answers(answers, references, version_2_with_negative=config.qa.version_2_with_negative)


def describe_scores(scores: dict) -> str:
    if "HasAns_f1" in scores or "NoAns_f1" in scores:
        parts = [f"EM {scores['exact']:.2f}, F1 {scores['f1']:.2f}"]
        parts += [f"{split} F1 {scores[split + '_f1']:.2f}" for split in ("HasAns", "NoAns") if split + "_f1" in scores]
        if "no_answer_threshold" in scores:
            parts.append(f"no-answer threshold {scores['no_answer_threshold']:.3f}")
        return ", ".join(parts)
    return f"EM {scores['exact_match']:.2f}, F1 {scores['f1']:.2f}"


def report_with_checkpoint(worker: Worker, metrics: dict, predictions: dict) -> None:
    """Every worker reports (a barrier); rank 0 attaches the checkpoint."""
    with tempfile.TemporaryDirectory() as directory:
        saved = None
        if worker.rank == 0:
            training_state = {**worker.state, "optimizer": worker.optimizer.state_dict(),
                              "scheduler": worker.scheduler.state_dict(), "scaler": worker.scaler.state_dict()}
            checkpoint.write_checkpoint(
                directory, model=getattr(worker.model, "module", worker.model), tokenizer=worker.tokenizer,
                training_state=training_state, predictions=predictions, history=worker.state["history"],
            )
            saved = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=saved)


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
