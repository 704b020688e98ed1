"""Driver-side pieces shared by a training run (``train_job.run``) and a search (``train_job.tune``)."""

from __future__ import annotations

import os
import time

from train_job import checkpoint
from train_job.config import TrainConfig
from train_job.data import feature_datasets
from train_job.loop import steps_per_epoch, train_loop_per_worker


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


def build_trainer(config: TrainConfig, data: PreparedData, *, name: str, storage_path: str, callbacks=(),
                  after_epoch=None):
    """The TorchTrainer of one run. ``after_epoch(epoch, resumed=...)`` runs on every worker after each
    epoch's report (tests use it to inject a failure)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train_config": config.to_dict(),
            "steps_per_epoch": steps_per_epoch(data.train_feature_count, config.num_workers, config.per_device_batch_size),
            "validation_records": data.validation_ref,
            "after_epoch": after_epoch,
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
        return checkpoint.read_history(directory)


def init_ray(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=True)


