"""Driver side of a training run: validate, featurise with Ray Data, fit with Ray Train, export."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from qa_common import load_tokenizer
from train_job.config import TrainConfig, save_config
from train_job.data import feature_datasets, load_splits
from train_job.export import export_run, push_to_hub
from train_job.loop import HISTORY, steps_per_epoch, train_loop_per_worker


class PreparedData:
    """Records and materialised feature datasets, shared by a run or by every trial of a search."""

    def __init__(self, config: TrainConfig, train_records: list[dict], validation_records: list[dict]):
        import ray

        started = time.perf_counter()
        self.train_records, self.validation_records = train_records, validation_records
        self.train_features, self.validation_features = feature_datasets(
            config, self.train_records, self.validation_records
        )
        self.train_feature_count = self.train_features.count()
        for dataset in (self.train_features, self.validation_features):  # the loop logs its own progress
            dataset.context.enable_progress_bars = False
        self.validation_ref = ray.put(self.validation_records)
        print(f"[train_job] {len(self.train_records)} training questions -> {self.train_feature_count} windows, "
              f"{len(self.validation_records)} validation questions; prepared in {time.perf_counter() - started:.1f} s",
              flush=True)

    def summary(self) -> dict:
        return {"train_examples": len(self.train_records), "train_features": self.train_feature_count,
                "eval_examples": len(self.validation_records)}


def build_trainer(config: TrainConfig, data: PreparedData, *, name: str, storage_path: str, callbacks=()):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    fault = os.environ.get("TRAIN_JOB_FAULT_AFTER_EPOCH")  # for recovery tests: fail once after that epoch
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train_config": config.to_dict(),
            "steps_per_epoch": steps_per_epoch(data.train_feature_count, config.num_workers, config.per_device_batch_size),
            "validation_records": data.validation_ref,
            "fault_after_epoch": int(fault) if fault else None,
        },
        scaling_config=ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker={"CPU": config.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.checkpoints_to_keep, checkpoint_score_attribute="f1", checkpoint_score_order="max"
            ),
            callbacks=list(callbacks),
        ),
        datasets={**training_shards(data.train_features, config.num_workers), "validation": data.validation_features},
        # Each worker reads its own training shard; every worker sees all validation features and
        # evaluates the questions assigned to it.
        dataset_config=DataConfig(datasets_to_split=[]),
    )


def training_shards(train_features, num_workers: int) -> dict:
    """``train_<rank>`` datasets whose sizes differ by at most one feature.

    Ray Train's own split (``streaming_split(equal=True)``) drops up to ``num_workers - 1`` features
    every epoch; splitting exactly keeps every feature, and the loop's DDP ``join`` absorbs the one
    extra step some workers take.
    """
    if num_workers == 1:
        return {"train_0": train_features}
    count = train_features.count()
    bounds = [count * rank // num_workers for rank in range(1, num_workers)]
    return {f"train_{rank}": shard for rank, shard in enumerate(train_features.split_at_indices(bounds))}


def best_checkpoint(result):
    """The reported checkpoint with the highest validation F1."""
    if not result.best_checkpoints:
        raise RuntimeError(f"the run at {result.path} reported no checkpoint")
    return max(result.best_checkpoints, key=lambda pair: pair[1]["f1"])


def epoch_history(result) -> list[dict]:
    """Per-epoch metrics of the whole run (every attempt), from its latest checkpoint."""
    with result.checkpoint.as_directory() as directory:
        return json.loads((Path(directory) / HISTORY).read_text(encoding="utf-8"))


def init_ray(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=True)


def run(config: TrainConfig) -> dict:
    """Train, evaluate and export; returns the exported metrics."""
    from ray.train import TrainingFailedError

    output_dir = Path(config.output_dir).resolve()
    storage_path = config.storage_path or str(output_dir / "checkpoints")
    started = time.perf_counter()
    records = load_splits(config)  # bad data and a wrong model name fail here, before Ray starts
    load_tokenizer(config.model)
    init_ray(config.address)
    data = PreparedData(config, *records)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir / "train_config.json")
    trainer = build_trainer(config, data, name=config.run_name, storage_path=storage_path)
    try:
        result = trainer.fit()
    except TrainingFailedError as error:
        print(f"[train_job] training failed: {error}\n[train_job] checkpoints are kept in "
              f"{storage_path}/{config.run_name}; run the same command again to resume from the last one.",
              file=sys.stderr)
        raise
    checkpoint, checkpoint_metrics = best_checkpoint(result)
    metrics = export_run(checkpoint, checkpoint_metrics, config, output_dir,
                         {**data.summary(), "history": epoch_history(result), "wall_time_s": time.perf_counter() - started})
    print(f"[train_job] exported {output_dir / 'model'}: EM {metrics['exact_match']:.2f}, F1 {metrics['f1']:.2f} "
          f"(epoch {metrics['best_epoch']} of {config.epochs})")
    if config.push_to_hub:
        push_to_hub(output_dir / "model", config.push_to_hub)
    return metrics
