"""The layout of a run's output directory (``--output-dir``): the one place that names its files.

    OUTPUT_DIR/
      model/             the Hugging Face model directory: config, weights, tokenizer, qa_config.json, README.md
      metrics.json       the exported epoch's validation metrics, training figures, calibration
      predictions.json   {question id: answer} on the validation split (what qa_common.evaluate reads)
      train_config.json  the run's TrainConfig
      tune_results.json  a search's trials (train_job.tune)
      tensorboard/RUN/   --report-to tensorboard event files
      checkpoints/RUN/   Ray Train's checkpoints, unless --storage-path puts them elsewhere

``train_job.predict`` writes ``metrics.json`` and ``predictions.json`` of the same meaning into its
``--output``. The layout inside a checkpoint is ``train_job.checkpoint``'s.
"""

from __future__ import annotations

from pathlib import Path

MODEL = "model"
METRICS = "metrics.json"
PREDICTIONS = "predictions.json"
TRAIN_CONFIG = "train_config.json"
TUNE_RESULTS = "tune_results.json"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"


def exported(output_dir: Path, run_name: str) -> list[Path]:
    """What an export (and the trackers) of a run or search wrote: deleted with the run by --overwrite."""
    return [output_dir / MODEL, output_dir / METRICS, output_dir / PREDICTIONS, output_dir / TUNE_RESULTS,
            output_dir / TENSORBOARD / run_name]
