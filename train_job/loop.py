"""The training loop that runs on every Ray Train worker: plain PyTorch around qa_common.

``train_loop_per_worker`` reads as: set up, then for each epoch train, evaluate and report a
checkpoint. The optimiser, schedule and step are in ``train_job.optim``; the validation pass in
``train_job.validation``; the checkpoint layout in ``train_job.checkpoint``.
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

from ray.experimental import tqdm_ray

from qa_common import load_model_and_tokenizer, trim_padding
from train_job import checkpoint
from train_job.allocator import active_allocator, set_up_allocator
from train_job.collectives import all_reduce_sum, gather_objects
from train_job.config import TrainConfig
from train_job.data import TrainingUnits, epoch_batches, epoch_shard, training_units
from train_job.dropout import training_dropout
from train_job.optim import (build_optimizer, build_scheduler, checkpoint_layers, resolve_precision,
                             set_attention_dropout, sparse_lookup_gradients, train_step)
from train_job.tracking import Trackers
from train_job.validation import describe_scores, evaluate, my_questions

GROUP_BATCHES = 32  # length grouping sorts this many batches' worth of features at a time
# Training batches are cut to a multiple of this many tokens: 6 % padding over the preset's windows against
# 10 % at qa_common's 32 (serving's multiple), 1.07x the windows/s (12 shapes within 256 tokens instead of 6).
# 8 was 1.10x but took bert-base past 3 GB (BENCHMARKS.md, "Batches cut to a multiple of 16 tokens").
TRAIN_LENGTH_MULTIPLE = 16
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
EPOCH_START = {"loss_sum": 0.0, "features": 0, "seconds": 0.0}  # an epoch's running totals, kept mid-epoch


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
    precision: str  # config.precision with "auto" resolved for this worker's device
    applied: dict  # what --cheap-dropout, --gradient-checkpointing and the CPU-only choices came to, read off the model
    state: dict  # counters, history, RNG states: saved with every checkpoint
    resumed: bool
    loop_config: dict  # what the driver passed: the run's name, fingerprint, test seams
    trackers: Trackers | None = None  # rank 0, with --report-to


def train_loop_per_worker(loop_config: dict) -> None:
    config = TrainConfig.from_dict(loop_config["train_config"])
    worker = set_up(config, loop_config)
    # The training windows, shared read-only through the object store (one copy per node).
    train_features = ray.get(loop_config["train_features"])
    units = training_units(train_features, config.per_device_batch_size)
    validation_records = ray.get(loop_config["validation_records"])
    validation_features = my_questions(ray.get(loop_config["validation_features"]), worker.rank, worker.world_size)
    worker_node_ids = gather_objects(ray.get_runtime_context().get_node_id(), worker.world_size)
    after_epoch = loop_config.get("after_epoch")  # a test seam: called after each epoch's report

    for epoch in range(worker.state["epoch"], config.epochs):
        train_metrics = train_epoch(worker, train_features, units, epoch)
        predictions, scores = evaluate(worker.model, config, worker.autocast, validation_features, validation_records,
                                       worker.rank, worker.world_size)
        metrics = {"epoch": epoch + 1, **train_metrics, "worker_node_ids": worker_node_ids, **scores}
        log(worker.rank, "epoch {epoch} done: loss {train_loss:.4f}, {scores}, {train_samples_per_second:.1f} windows/s"
            .format(**metrics, scores=describe_scores(scores)))
        if worker.trackers:
            worker.trackers.scalars({**{f"eval/{name}": value for name, value in scores.items()
                                        if isinstance(value, (int, float))},
                                     "train/epoch_loss": train_metrics["train_loss"],
                                     "train/epoch_windows_per_s": train_metrics["train_samples_per_second"]},
                                    worker.state["step"])
        worker.state["epoch"] = epoch + 1
        worker.state["history"].append(metrics)
        report_with_checkpoint(worker, metrics, predictions)
        if after_epoch is not None:
            after_epoch(epoch + 1, resumed=worker.resumed)
    if worker.trackers:
        worker.trackers.close(finished=True)


def set_up(config: TrainConfig, loop_config: dict) -> Worker:
    """Model, optimiser and schedule, from the last checkpoint when Ray Train restarts a failed run."""
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # Ray sets OMP_NUM_THREADS to the whole CPUs reserved: 1.9 (a 2-core machine less a Tune trial
        # driver's 0.1) would run one thread, at half speed.
        torch.set_num_threads(max(1, math.ceil(config.cpus_per_worker)))
    allocator = set_up_allocator() if device.type == "cpu" else active_allocator()
    torch.manual_seed(config.seed)
    resumed_from = ray.train.get_checkpoint()
    state = {"epoch": 0, "step": 0, "step_in_epoch": 0, "epoch_so_far": dict(EPOCH_START), "train_runtime_s": 0.0,
             "train_features_seen": 0, "history": [], "rng": [], "mlflow_run_id": None}
    if resumed_from:
        with resumed_from.as_directory() as directory:
            model, tokenizer = load_model_and_tokenizer(str(checkpoint.model_dir(directory)))
            state = checkpoint.read_training_state(directory)
        log(rank, f"resumed from the checkpoint of epoch {state['epoch'] + (state['step_in_epoch'] > 0)} "
                  f"(step {state['step']})")
    else:
        # fp32 master weights whatever the stored dtype (transformers 5 would keep a bf16 checkpoint in bf16).
        model, tokenizer = load_model_and_tokenizer(config.model, dtype=torch.float32)
    set_attention_dropout(model, config.attention_dropout)
    dropout = training_dropout(model, config.cheap_dropout, device)
    if config.gradient_checkpointing:
        checkpoint_layers(model)
    sparse_lookup = sparse_lookup_gradients(model, device, config.compile)  # before DDP wraps the model
    applied = {"training_dropout": dropout, "gradient_checkpointing": model.is_activation_checkpointing,
               "sparse_lookup_gradient": sparse_lookup, "allocator": allocator}
    model = ray.train.torch.prepare_model(model)
    if config.compile:
        # Trimmed batches change length every step: compile for dynamic shapes once, not per length.
        model = torch.compile(model, dynamic=True)

    optimizer = build_optimizer(model, learning_rate=config.learning_rate, weight_decay=config.weight_decay)
    total_steps = loop_config["steps_per_epoch"] * config.epochs
    scheduler = build_scheduler(optimizer, warmup_steps=int(config.warmup_ratio * total_steps), total_steps=total_steps)
    precision = resolve_precision(config.precision, device)
    if config.precision == "auto":
        log(rank, f"--precision auto: {precision} on this worker's {device.type.upper()}")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if resumed_from:
        # Popped: the loaded copies (on the CPU) are freed once the optimiser holds its own on the device.
        optimizer.load_state_dict(state.pop("optimizer"))
        scheduler.load_state_dict(state.pop("scheduler"))
        scaler.load_state_dict(state.pop("scaler"))
        if len(state["rng"]) == world_size:  # last: loading the model above drew random numbers
            checkpoint.restore_rng_states(state["rng"][rank])
    autocast = torch.autocast(
        device.type, dtype=AUTOCAST_DTYPES.get(precision), enabled=precision in AUTOCAST_DTYPES
    )
    worker = Worker(config, rank, world_size, device, model, tokenizer, optimizer, scheduler, scaler, autocast,
                    precision, applied, state, resumed=bool(resumed_from), loop_config=loop_config)
    if rank == 0 and config.trackers:
        worker.trackers = Trackers(config, loop_config["run_name"], step=state["step"],
                                   mlflow_run_id=state["mlflow_run_id"])
        state["mlflow_run_id"] = worker.trackers.mlflow_run_id
    return worker


def train_epoch(worker: Worker, train_features: dict, units: TrainingUnits, epoch: int) -> dict:
    """One pass over this worker's share of the epoch (from a mid-epoch checkpoint's step when resuming);
    returns the epoch's training metrics, summed over workers. The epoch shuffles and batches
    ``units``: windows, or whole questions with shared normalisation."""
    config, state, steps_per_epoch = worker.config, worker.state, worker.loop_config["steps_per_epoch"]
    after_step = worker.loop_config.get("after_step")
    worker.model.train()
    batches = epoch_batches(
        epoch_shard(len(units), worker.world_size, worker.rank, epoch, config.seed), units.lengths,
        units.per_batch, np.random.default_rng([config.seed, epoch, worker.rank]),
        GROUP_BATCHES if config.group_by_length else 1,
    )
    # Mid-epoch checkpoints come only at steps every worker takes (shards differ by one unit at most).
    common_steps = math.ceil(len(units) // worker.world_size / units.per_batch)
    so_far, first_step = state["epoch_so_far"], state["step_in_epoch"] + 1
    # A mid-epoch checkpoint holds the sums over all workers so far: rank 0 carries them on.
    carried = so_far if worker.rank == 0 else EPOCH_START
    loss_sum = torch.tensor(carried["loss_sum"], device=worker.device)
    features_seen, started = carried["features"], time.perf_counter() - so_far["seconds"]
    progress = progress_bar(worker, epoch, steps_per_epoch, first_step - 1)
    # Shards differ by at most one feature, so workers may take different numbers of steps; DDP's
    # join lets the workers that finish first take part in the others' gradient all-reduce.
    with worker.model.join() if worker.world_size > 1 else contextlib.nullcontext():
        for step_in_epoch in range(first_step, len(batches) + 1):
            rows = units.windows(batches[step_in_epoch - 1])
            batch = training_batch(train_features, rows, worker.device)
            try:
                loss = train_step(worker.model, batch, optimizer=worker.optimizer, scheduler=worker.scheduler,
                                  scaler=worker.scaler, autocast=worker.autocast, max_tokens=config.max_batch_tokens)
            except FloatingPointError as error:
                raise FloatingPointError(
                    f"training diverged at epoch {epoch + 1} step {step_in_epoch}: {error}; "
                    f"lower the learning rate ({config.learning_rate:g})"
                ) from None
            loss_sum += loss
            features_seen += len(batch["input_ids"])
            state["step"] += 1
            state["step_in_epoch"] = step_in_epoch
            if progress is not None:
                show_progress(worker, progress, loss, features_seen * worker.world_size / (time.perf_counter() - started),
                              log_every=max(1, steps_per_epoch // 20))
            if config.checkpoint_every_steps and step_in_epoch % config.checkpoint_every_steps == 0 \
                    and step_in_epoch < common_steps:
                summed = all_reduce_sum(torch.tensor([loss_sum.item(), features_seen], dtype=torch.float64))
                state["epoch_so_far"] = {"loss_sum": float(summed[0]), "features": int(summed[1]),
                                         "seconds": time.perf_counter() - started}
                # No F1 yet: not even NaN, which Ray's checkpoint manager stores as null and cannot rank on restore.
                report_with_checkpoint(worker, {"epoch": epoch, "step": state["step"]}, None)
            if after_step is not None:
                after_step(epoch + 1, step_in_epoch, resumed=worker.resumed)
    if progress is not None:
        progress.close()
    epoch_seconds = time.perf_counter() - started
    steps_taken = len(batches)
    totals = all_reduce_sum(torch.tensor([features_seen, loss_sum.item(), steps_taken], device=worker.device))
    state["train_runtime_s"] += epoch_seconds
    state["train_features_seen"] += int(totals[0])
    state["step_in_epoch"], state["epoch_so_far"] = 0, dict(EPOCH_START)
    return {
        "step": state["step"],
        "train_loss": float(totals[1] / totals[2]),
        "train_features_seen": state["train_features_seen"],
        "train_samples_per_second": float(totals[0]) / epoch_seconds,
        "train_runtime_s": state["train_runtime_s"],
        "training_precision": worker.precision,
        **worker.applied,
    }


def training_batch(features: dict, rows, device: torch.device | None = None,
                   multiple_of: int = TRAIN_LENGTH_MULTIPLE) -> dict[str, torch.Tensor]:
    """The features' ``rows`` as one training batch: padding cut to ``multiple_of`` tokens, long tensors."""
    trimmed = trim_padding({name: values[rows] for name, values in features.items()}, multiple_of=multiple_of)
    return {name: torch.as_tensor(values, dtype=torch.long, device=device) for name, values in trimmed.items()}


def progress_bar(worker: Worker, epoch: int, steps_per_epoch: int, done: int):
    """Rank 0's live bar (drawn by the driver: Ray's distributed tqdm); None on the other ranks."""
    if worker.rank != 0:
        return None
    bar = tqdm_ray.tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{worker.config.epochs}", unit="step")
    bar.update(done)
    return bar


def show_progress(worker: Worker, bar, loss: torch.Tensor, windows_per_s: float, *, log_every: int) -> None:
    """Advance the bar; every ``log_every`` steps also show loss and learning rate (reading the loss
    waits for the device, so not every step) and send them to the trackers."""
    bar.update(1)
    step = worker.state["step"]
    if worker.state["step_in_epoch"] % log_every and worker.state["step_in_epoch"] != bar.total:
        return
    lr, loss_value = worker.scheduler.get_last_lr()[0], loss.item()
    bar.set_description(f"epoch {worker.state['epoch'] + 1}/{worker.config.epochs} loss {loss_value:.4f} "
                        f"lr {lr:.3g} {windows_per_s:.1f} windows/s")
    if worker.trackers:
        worker.trackers.scalars({"train/loss": loss_value, "train/learning_rate": lr,
                                 "train/windows_per_s": windows_per_s}, step)


def report_with_checkpoint(worker: Worker, metrics: dict, predictions: dict | None) -> None:
    """Every worker reports (a barrier); rank 0 attaches the checkpoint, with every worker's RNG states."""
    worker.state["rng"] = gather_objects(checkpoint.rng_states(), worker.world_size)
    with tempfile.TemporaryDirectory() as directory:
        saved = None
        if worker.rank == 0:
            training_state = {**worker.state, "optimizer": worker.optimizer.state_dict(),
                              "scheduler": worker.scheduler.state_dict(), "scaler": worker.scaler.state_dict()}
            checkpoint.write_checkpoint(
                directory, model=getattr(worker.model, "module", worker.model), tokenizer=worker.tokenizer,
                training_state=training_state, predictions=predictions, history=worker.state["history"],
                train_config={"config": worker.config.to_dict(), "fingerprint": worker.loop_config["fingerprint"]},
            )
            saved = ray.train.Checkpoint.from_directory(directory)
            if worker.trackers:
                worker.trackers.flush()
        ray.train.report(metrics, checkpoint=saved)


def log(rank: int, message: str) -> None:
    if rank == 0:
        print(f"[train_job] {message}", flush=True)


def steps_per_epoch(units: TrainingUnits, num_workers: int) -> int:
    """Steps of the worker with the largest shard (shards differ by at most one unit)."""
    return max(1, math.ceil(math.ceil(len(units) / num_workers) / units.per_batch))
