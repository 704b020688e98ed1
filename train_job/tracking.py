"""``--report-to tensorboard,mlflow``: the run's scalars where a user can plot them, offline.

Rank 0 writes them: training loss, learning rate and windows/s every few steps, EM/F1/precision/
recall and the epoch's loss after each epoch (the step is the global optimiser step).

- tensorboard: event files in ``OUTPUT_DIR/tensorboard/RUN_NAME`` (``tensorboard --logdir OUTPUT_DIR/tensorboard``).
  A resumed run purges the events past its checkpoint's step, so a curve has no doubled segment.
- mlflow: a run named RUN_NAME in experiment ``train_job`` of ``--mlflow-tracking-uri``, by
  default a local store file, ``OUTPUT_DIR/mlflow.db`` (``mlflow ui --backend-store-uri
  sqlite:///OUTPUT_DIR/mlflow.db``): MLflow 3 refuses its old ``mlruns/`` file store unless told
  otherwise, and recommends SQLite. A resumed run logs into the same MLflow run (its id is kept in
  the checkpoint).
"""

from __future__ import annotations

from pathlib import Path

from train_job import run_dir
from train_job.config import TrainConfig

MLFLOW_EXPERIMENT = "train_job"
MLFLOW_DB = "mlflow.db"


class Trackers:
    def __init__(self, config: TrainConfig, run_name: str, *, step: int, mlflow_run_id: str | None):
        self.tensorboard = self.mlflow = None
        self.mlflow_run_id = mlflow_run_id
        output_dir = Path(config.output_dir)
        if "tensorboard" in config.trackers:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(output_dir / run_dir.TENSORBOARD / run_name), purge_step=step or None)
        if "mlflow" in config.trackers:
            import mlflow

            mlflow.set_tracking_uri(config.mlflow_tracking_uri or f"sqlite:///{(output_dir / MLFLOW_DB).resolve()}")
            experiment = mlflow.set_experiment(MLFLOW_EXPERIMENT)
            self.mlflow = mlflow.MlflowClient()
            if mlflow_run_id is None:
                run = self.mlflow.create_run(experiment.experiment_id, run_name=run_name)
                self.mlflow_run_id = run.info.run_id
                settings = {k: v for k, v in config.to_dict().items() if k != "qa"}
                self.mlflow.log_batch(self.mlflow_run_id, params=[
                    mlflow.entities.Param(k, str(v)) for k, v in {**settings, **config.qa.to_dict()}.items()])

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.tensorboard:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, step)
        if self.mlflow:
            import mlflow

            self.mlflow.log_batch(self.mlflow_run_id, metrics=[
                mlflow.entities.Metric(name.replace("/", "_"), float(value), int(_now_ms()), step)
                for name, value in values.items()])

    def flush(self) -> None:
        if self.tensorboard:
            self.tensorboard.flush()

    def close(self, finished: bool) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.mlflow and finished:
            self.mlflow.set_terminated(self.mlflow_run_id)


def _now_ms() -> float:
    import time

    return time.time() * 1000
