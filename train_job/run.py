"""A training run: validate, featurise with Ray Data, fit with Ray Train, export (``python -m train_job``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from qa_common import load_tokenizer
from qa_common.features import check_tokenizer
from train_job import run_dir
from train_job.config import TrainConfig, save_config
from train_job.data import load_splits
from train_job.ray_cluster import connect_ray
from train_job.driver import PreparedData, best_checkpoint, build_trainer, epoch_history, fit_to_cluster, startup_failure
from train_job.publish import publish_run, push_to_hub
from train_job.fingerprint import claim_run_dir, run_fingerprint


def run(config: TrainConfig, *, after_epoch=None, after_step=None) -> dict:
    """Train, evaluate and export; returns the exported metrics. The seams: see ``build_trainer``."""
    from ray.train import TrainingFailedError

    config = config.with_absolute_paths()
    output_dir = Path(config.output_dir)
    storage_path = config.storage_path or str(output_dir / run_dir.CHECKPOINTS)
    started = time.perf_counter()
    train, validation = load_splits(config)  # bad data and a wrong model name fail here, before Ray starts
    check_tokenizer(load_tokenizer(config.model), config.qa)
    fingerprint = run_fingerprint(config, train, validation)
    own_ray = connect_ray(config.address, log_to_driver=True)
    config = fit_to_cluster(config)
    claim_run_dir(f"{storage_path.rstrip('/')}/{config.run_name}", fingerprint, config,
                  exported=run_dir.exported(output_dir, config.run_name))
    data = PreparedData(config, train, validation, own_ray=own_ray)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir / run_dir.TRAIN_CONFIG)
    trainer = build_trainer(config, data, name=config.run_name, storage_path=storage_path, fingerprint=fingerprint,
                            after_epoch=after_epoch, after_step=after_step)
    try:
        result = trainer.fit()
    except TrainingFailedError as error:
        not_started = startup_failure(error, config)
        if not_started:
            raise not_started from None
        print(f"[train_job] training failed: {error}\n[train_job] checkpoints are kept in "
              f"{storage_path}/{config.run_name}; run the same command again to resume from the last one.",
              file=sys.stderr)
        raise
    checkpoint, checkpoint_metrics = best_checkpoint(result)
    metrics = publish_run(checkpoint, checkpoint_metrics, config, output_dir,
                         {**data.summary(), "history": epoch_history(result), "wall_time_s": time.perf_counter() - started},
                         validation)
    print(f"[train_job] exported {output_dir / run_dir.MODEL}: EM {metrics['exact_match']:.2f}, F1 {metrics['f1']:.2f} "
          f"(epoch {metrics['best_epoch']} of {config.epochs})")
    if config.export_onnx:
        from qa_common.export_onnx import card_section, export_onnx

        record = export_onnx(output_dir / run_dir.MODEL, optimize=True, int8=True, validation_records=validation,
                             validation_name=Path(config.validation_file).name if config.validation_file else config.dataset)
        print(f"[train_job] {card_section(record)}")
    if config.push_to_hub:
        push_to_hub(output_dir / run_dir.MODEL, config.push_to_hub, public=config.hub_public)
    return metrics
