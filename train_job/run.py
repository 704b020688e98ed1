"""A training run: validate, featurise with Ray Data, fit with Ray Train, export (``python -m train_job``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from qa_common import load_tokenizer
from train_job.config import TrainConfig, save_config
from train_job.data import load_splits
from train_job.driver import PreparedData, best_checkpoint, build_trainer, epoch_history, init_ray
from train_job.export import export_run, push_to_hub


def run(config: TrainConfig, *, after_epoch=None) -> dict:
    """Train, evaluate and export; returns the exported metrics. ``after_epoch``: see ``build_trainer``."""
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
    trainer = build_trainer(config, data, name=config.run_name, storage_path=storage_path, after_epoch=after_epoch)
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
    if config.export_onnx:
        from qa_common.export_onnx import card_section, export_onnx

        record = export_onnx(output_dir / "model", optimize=True, int8=True, validation_records=records[1],
                             validation_name=Path(config.validation_file).name if config.validation_file else config.dataset)
        print(f"[train_job] {card_section(record)}")
    if config.push_to_hub:
        push_to_hub(output_dir / "model", config.push_to_hub)
    return metrics
