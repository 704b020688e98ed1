"""Driver-side pieces shared by a training run (``train_job.run``) and a search (``train_job.tune``)."""

from __future__ import annotations

import math
import os
import time

from train_job import checkpoint
from train_job.allocator import worker_runtime_env
from train_job.config import TrainConfig, TrainJobError
from train_job.data import feature_datasets, training_units
from train_job.loop import steps_per_epoch, train_loop_per_worker
from train_job.ray_cluster import stop_ray_data_stats_actor
from train_job.resources import ResourceError, check_fits, cluster_capacity, one_machine, resolve_cpus_per_worker

# Ray Train v2 reads these variables in the process that builds the trainer and passes them on to
# its controller and workers.
WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
# Train's print patch sends a worker's print both to the original stdout (Ray's worker stdout is not
# sys.__stdout__, so it "tees") and to a logger with a console handler: log_to_driver then shows
# every line twice, and the progress bar's updates twice. Plain print: each line once.
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"
# Train's preemption watcher (an actor polling for nodes being drained) has nothing to watch on one
# machine that cannot grow, and it costs CPU there (BENCHMARKS.md, "Ray's own processes during training").
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


class PreparedData:
    """Records and feature data, shared by a run or by every trial of a search.

    The training and validation windows go into the object store once each, as one array per column
    (``train_features_ref``, ``validation_features_ref``): each worker draws its shuffled share of
    the training windows every epoch (``train_job.data.epoch_shard``) and evaluates the validation
    questions assigned to it. ``own_ray``: the job started its Ray itself, so Ray Data's statistics
    actor, idle from here on, is stopped (``train_job.ray_cluster.stop_ray_data_stats_actor``).
    """

    def __init__(self, config: TrainConfig, train_records: list[dict], validation_records: list[dict], *,
                 own_ray: bool = False):
        import ray

        started = time.perf_counter()
        self.train_records, self.validation_records = train_records, validation_records
        train_features, validation_features = feature_datasets(config, self.train_records, self.validation_records)
        self.train_feature_count = len(train_features["input_ids"])
        self.train_units = training_units(train_features, config.per_device_batch_size)
        self.train_features_ref = ray.put(train_features)
        self.validation_features_ref = ray.put(validation_features)
        del train_features, validation_features
        self.validation_ref = ray.put(self.validation_records)
        if own_ray:  # featurising was Ray Data's last work in this job
            stop_ray_data_stats_actor()
        units = self.train_units
        training = f"{len(self.train_records)} training questions" if units.rows is None else \
            f"{len(units)} training questions ({len(self.train_records)} passages, normalised together per question)"
        print(f"[train_job] {training} -> {self.train_feature_count} windows, {len(self.validation_records)} validation "
              f"questions; prepared in {time.perf_counter() - started:.1f} s", flush=True)
        if units.rows is not None:
            print(f"[train_job] batches of {units.per_batch} whole questions "
                  f"(~{config.per_device_batch_size} windows)", flush=True)

    def summary(self) -> dict:
        return {"train_examples": len(self.train_records), "train_features": self.train_feature_count,
                "eval_examples": len(self.validation_records)}


def build_trainer(config: TrainConfig, data: PreparedData, *, name: str, storage_path: str, fingerprint: dict | None = None,
                  callbacks=(), after_epoch=None, after_step=None, checkpoint_metric: str = "f1"):
    """The TorchTrainer of one run; its checkpoints are kept by the highest validation ``checkpoint_metric``.

    Test seams, run on every worker: ``after_epoch(epoch, resumed=...)`` after each epoch's report,
    ``after_step(epoch, step_in_epoch, resumed=...)`` after each training step (and its mid-epoch
    checkpoint, if any); tests raise in them to inject a failure.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Workers that cannot be placed within the timeout fail the run (controller_failure_limit=0)
    # instead of Ray Train retrying the start forever.
    os.environ[WORKER_GROUP_START_TIMEOUT_ENV] = str(config.worker_start_timeout_s)
    os.environ.setdefault(PRINT_PATCH_ENV, "0")
    if one_machine():
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train_config": config.to_dict(),
            "run_name": name,
            "fingerprint": fingerprint,
            "steps_per_epoch": steps_per_epoch(data.train_units, config.num_workers),
            "train_features": data.train_features_ref,
            "validation_features": data.validation_features_ref,
            "validation_records": data.validation_ref,
            "after_epoch": after_epoch,
            "after_step": after_step,
        },
        scaling_config=ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker={"CPU": config.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            worker_runtime_env=worker_runtime_env(config.allocator),
            failure_config=FailureConfig(max_failures=config.max_failures, controller_failure_limit=0),
            # Mid-epoch checkpoints have no F1 (Ray logs that it is missing): they rank last, but the latest is always kept.
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.checkpoints_to_keep, checkpoint_score_attribute=checkpoint_metric,
                checkpoint_score_order="max"
            ),
            callbacks=list(callbacks),
        ),
    )


def fit_to_cluster(config: TrainConfig, *, driver_cpus: float = 0.0) -> TrainConfig:
    """``config`` with "auto" CPUs resolved for the connected cluster; ResourceError if it cannot fit."""
    capacity = cluster_capacity()
    config = resolve_cpus_per_worker(config, capacity, driver_cpus=driver_cpus)
    check_fits(config, capacity, driver_cpus=driver_cpus)
    return config


def startup_failure(error: Exception, config: TrainConfig) -> TrainJobError | None:
    """A ResourceError for a run whose workers could not start in time (else None)."""
    cause = getattr(error, "controller_failure", None)
    if type(cause).__name__ != "WorkerGroupStartupTimeoutError":
        return None
    return ResourceError(
        f"the {config.num_workers} worker(s) ({config.cpus_per_worker:g} CPUs{' and a GPU' if config.use_gpu else ''} "
        f"each) could not start within --worker-start-timeout-s {config.worker_start_timeout_s:g}: the cluster "
        "lacks free resources for them (other jobs, or nodes the autoscaler could not add)")


def best_checkpoint(result):
    """The end-of-epoch checkpoint with the highest validation F1 (mid-epoch ones have no F1)."""
    scored = [pair for pair in result.best_checkpoints if not math.isnan(pair[1].get("f1", math.nan))]
    if not scored:
        raise RuntimeError(f"the run at {result.path} reported no end-of-epoch checkpoint")
    return max(scored, key=lambda pair: pair[1]["f1"])


def epoch_history(result) -> list[dict]:
    """Per-epoch metrics of the whole run (every attempt), from its latest checkpoint."""
    with result.checkpoint.as_directory() as directory:
        return checkpoint.read_history(directory)


