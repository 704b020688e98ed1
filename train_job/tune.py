"""``python -m train_job.tune``: search the learning rate with Ray Tune over the Ray Train job.

Ray 2.60 runs Ray Train v2, where a Tuner no longer wraps a Trainer. Instead every Tune trial runs
a small driver function that builds and fits its own ``TorchTrainer``; the trainer's
``TuneReportCallback`` forwards each epoch's metrics to Tune, so ASHA can stop poor trials early.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from qa_common import load_tokenizer
from qa_common.features import check_tokenizer
from train_job.config import TrainConfig, TrainJobError
from train_job.data import load_splits
from train_job.ray_cluster import connect_ray
from train_job.driver import PreparedData, build_trainer, fit_to_cluster
from train_job.publish import publish_run
from train_job.fingerprint import claim_run_dir, run_fingerprint
from train_job import run_dir
from train_job.resources import TRIAL_DRIVER_CPUS

SEARCH_SETTINGS = ("lr_min", "lr_max", "lr_grid", "num_samples", "scheduler", "grace_period", "metric")


def run_trial(trial_config: dict, base_config: TrainConfig, data: PreparedData, storage_path: str,
              fingerprint: dict, metric: str) -> None:
    """One Tune trial: a whole Ray Train run at the trial's learning rate."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    config = dataclasses.replace(base_config, learning_rate=trial_config["learning_rate"])
    trial_id = tune.get_context().get_trial_id()
    trainer = build_trainer(config, data, name=f"trial-{trial_id}", storage_path=storage_path,
                            fingerprint={**fingerprint, "learning_rate": config.learning_rate},
                            callbacks=[TuneReportCallback()], checkpoint_metric=metric)
    trainer.fit()


def search_space(args) -> dict:
    from ray import tune

    if args.lr_grid:
        return {"learning_rate": tune.grid_search(args.lr_grid)}
    return {"learning_rate": tune.loguniform(args.lr_min, args.lr_max)}


def default_concurrency(config: TrainConfig) -> int:
    """As many trials at once as the cluster has room for; the rest wait for resources."""
    import ray

    resources = ray.cluster_resources()
    if config.use_gpu:
        return max(1, int(resources.get("GPU", 0) // config.num_workers))
    # Each trial needs its workers' CPUs plus its driver's.
    return max(1, int(resources.get("CPU", 1) // (config.num_workers * config.cpus_per_worker + TRIAL_DRIVER_CPUS)))


def search(config: TrainConfig, args) -> dict:
    """Run (or resume) the search, export the best trial's model; returns the summary."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    config = config.with_absolute_paths()
    output_dir = Path(config.output_dir)
    train, validation = load_splits(config)
    check_tokenizer(load_tokenizer(config.model), config.qa)
    # The search is identified by the settings it does not search, its search space, and the data.
    fingerprint = run_fingerprint(config, train, validation, ignore=("learning_rate",),
                                  extra={"search": {name: getattr(args, name) for name in SEARCH_SETTINGS}})
    own_ray = connect_ray(config.address, log_to_driver=True)
    config = fit_to_cluster(config, driver_cpus=TRIAL_DRIVER_CPUS)
    storage_path = config.storage_path or str(output_dir / "tune")
    experiment = f"{storage_path.rstrip('/')}/{args.name}"  # a path or a URI (s3://, gs://)
    resuming = claim_run_dir(experiment, fingerprint, config, exported=run_dir.exported(output_dir, args.name))
    data = PreparedData(config, train, validation, own_ray=own_ray)
    # A NaN learning rate is not a transient failure: fail the trial, do not retry it.
    trial_base = dataclasses.replace(config, max_failures=0)
    trainable = tune.with_parameters(run_trial, base_config=trial_base, data=data, storage_path=storage_path,
                                     fingerprint=fingerprint, metric=args.metric)
    # The trial driver only coordinates; its workers hold the real resources.
    trainable = tune.with_resources(trainable, {"CPU": TRIAL_DRIVER_CPUS})
    if resuming and tune.Tuner.can_restore(experiment):
        print(f"[train_job.tune] resuming the search in {experiment}")
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=False)
    else:
        scheduler = (ASHAScheduler(time_attr="epoch", max_t=config.epochs, grace_period=args.grace_period)
                     if args.scheduler == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(args),
            tune_config=tune.TuneConfig(
                metric=args.metric, mode="max", scheduler=scheduler,
                num_samples=1 if args.lr_grid else args.num_samples,
                max_concurrent_trials=args.max_concurrent_trials or default_concurrency(config),
            ),
            run_config=tune.RunConfig(name=args.name, storage_path=storage_path),
        )
    results = tuner.fit()
    trials = summarize_trials(results, config.epochs, args.metric)
    ranked = [t for t in trials if t["status"] != "failed" and t[args.metric] is not None]
    if not ranked:
        raise TrainJobError("every trial failed; see the reasons above (lower the learning rates if they diverged)")
    best = max(ranked, key=lambda t: t[args.metric])
    best_config = dataclasses.replace(config, learning_rate=best["learning_rate"])
    from ray.train import Checkpoint

    # Checkpoint paths come without the URI scheme; the experiment's filesystem resolves them.
    best_checkpoint = Checkpoint(best["best_checkpoint_path"], filesystem=results.filesystem)
    metrics = publish_run(best_checkpoint, best["best_metrics"], best_config, output_dir,
                         {**data.summary(), "tuned_over": len(trials)}, validation)
    summary = {"metric": args.metric, "best": {k: v for k, v in best.items() if k != "best_metrics"},
               "trials": [{k: v for k, v in t.items() if k != "best_metrics"} for t in trials],
               "experiment_path": experiment, "exported_model": str(output_dir / run_dir.MODEL), "best_metrics": metrics}
    (output_dir / run_dir.TUNE_RESULTS).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(results_table(trials, best))
    print(f"[train_job.tune] best learning rate {best['learning_rate']:.3g} (F1 {best['f1']:.2f}); model exported to "
          f"{output_dir / run_dir.MODEL}; serve it with: python -m serve_app --model {output_dir / run_dir.MODEL}")
    return summary


def summarize_trials(results, max_epochs: int, metric: str) -> list[dict]:
    trials = []
    for result in results:
        frame = result.metrics_dataframe
        history = frame.to_dict("records") if frame is not None and not frame.empty else []
        scored = [row for row in history if _is_number(row.get(metric))]
        best_row = max(scored, key=lambda r: r[metric]) if scored else None
        last = history[-1] if history else {}
        epochs_run = int(last.get("epoch", 0))
        if result.error:
            status = "failed"
        elif epochs_run < max_epochs:
            status = "stopped early"
        else:
            status = "completed"
        trials.append({
            "trial_id": Path(result.path).name,
            "learning_rate": trial_params(result)["learning_rate"],
            "epochs_run": epochs_run,
            "status": status,
            "stopped_early": status == "stopped early",
            "error": _reason(result.error) if result.error else None,
            "exact_match": best_row["exact_match"] if best_row else None,
            "f1": best_row["f1"] if best_row else None,
            "final_f1": last.get("f1"),
            "best_epoch": int(best_row["epoch"]) if best_row else None,
            "best_checkpoint_path": best_row.get("checkpoint_path") if best_row else None,
            "best_metrics": best_row,
        })
    return sorted(trials, key=lambda t: t["learning_rate"])


def trial_params(result) -> dict:
    # A restored trial that failed before reporting anything comes back without its config.
    if result.config:
        return result.config
    with result.filesystem.open_input_stream(f"{result.path}/params.json") as file:
        return json.loads(file.read())


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def _reason(error: Exception) -> str:
    """The innermost message of a trial failure (Tune wraps Train's, which wraps the worker's)."""
    text = str(error).strip().splitlines()
    for marker in ("FloatingPointError", "Error:"):
        for line in reversed(text):
            if marker in line:
                return line.strip()
    return text[-1] if text else type(error).__name__


def results_table(trials: list[dict], best: dict) -> str:
    header = f"{'learning rate':>14} {'epochs':>6} {'EM':>7} {'F1':>7}  status"
    rows = [header, "-" * len(header)]
    for t in trials:
        em = f"{t['exact_match']:.2f}" if t["exact_match"] is not None else "-"
        f1 = f"{t['f1']:.2f}" if t["f1"] is not None else "-"
        status = t["status"] + (f": {t['error']}" if t["error"] else "") + ("  <- best" if t is best else "")
        rows.append(f"{t['learning_rate']:>14.3g} {t['epochs_run']:>6} {em:>7} {f1:>7}  {status}")
    return "\n".join(rows)


def add_search_flags(parser: argparse.ArgumentParser) -> None:
    search_flags = parser.add_argument_group("search")
    search_flags.add_argument("--lr-min", type=float, default=1e-5, help="log-uniform search: lowest rate (default: 1e-5)")
    search_flags.add_argument("--lr-max", type=float, default=3e-4, help="log-uniform search: highest rate (default: 3e-4)")
    search_flags.add_argument("--lr-grid", type=lambda s: [float(v) for v in s.split(",")], default=None,
                              help="comma-separated learning rates to try instead, e.g. 1e-5,3e-5,1e-4")
    search_flags.add_argument("--num-samples", type=int, default=4, help="trials drawn from the log-uniform range (default: 4)")
    search_flags.add_argument("--max-concurrent-trials", type=int, default=None,
                              help="trials at once (default: as many as the cluster fits)")
    search_flags.add_argument("--scheduler", choices=("asha", "none"), default="asha",
                              help="asha stops poor trials after --grace-period epochs (default: asha)")
    search_flags.add_argument("--grace-period", type=int, default=1, help="epochs every trial gets before ASHA may stop it")
    search_flags.add_argument("--metric", choices=("f1", "exact_match"), default="f1",
                              help="validation metric to maximise: ranks the trials and each trial's checkpoints "
                                   "(default: f1)")
    search_flags.add_argument("--name", default="lr-search",
                              help="search name; re-running with the same name and output dir resumes it")


def check_search_args(args: argparse.Namespace) -> None:
    if not 0 < args.lr_min < args.lr_max:
        raise ValueError("--lr-min must be positive and below --lr-max")
    if args.lr_grid is not None and not all(lr > 0 for lr in args.lr_grid):
        raise ValueError("--lr-grid rates must be positive")
    if args.num_samples < 1 or args.grace_period < 1 or (args.max_concurrent_trials or 1) < 1:
        raise ValueError("--num-samples, --grace-period and --max-concurrent-trials must be positive")
    if args.checkpoint_every_steps:
        raise ValueError("--checkpoint-every-steps is for train_job; Tune trials checkpoint every epoch")


def main(argv: list[str] | None = None) -> int:
    from train_job.cli import run_command

    return run_command(
        argv, start=search, add_flags=add_search_flags, check_args=check_search_args,
        preset_overrides={"output_dir": "runs/tune", "checkpoint_every_steps": None}, prog="python -m train_job.tune",
        description="Search the learning rate of the train_job recipe with Ray Tune (ASHA early stopping on "
        "per-epoch validation F1), then export the best trial's model like a train_job run.",
    )


if __name__ == "__main__":
    sys.exit(main())
