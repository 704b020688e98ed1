"""Learning-rate search with Ray Tune over the Ray Train job, on CPU with a tiny model."""

import json
import re

import numpy as np
import pytest

from conftest import FIXTURES
from qa_common import load_model_and_tokenizer
from train_job import tune as lr_search


def test_search_ranks_trials_fails_the_diverging_one_and_exports_the_best(local_ray, tiny_model_dir, tmp_path, capsys):
    argv = [
        "--model", str(tiny_model_dir), "--train-file", str(FIXTURES / "tiny-squad.jsonl"),
        "--validation-file", str(FIXTURES / "tiny-squad.json"), "--output-dir", str(tmp_path),
        "--epochs", "2", "--per-device-batch-size", "4", "--max-length", "48", "--stride", "16",
        "--max-question-length", "20", "--warmup-ratio", "0", "--cpus-per-worker", "1", "--lr-grid", "1e-3,5e-3,1e30",
    ]
    assert lr_search.main(argv) == 0
    summary = json.loads((tmp_path / "tune_results.json").read_text())
    trials = summary["trials"]
    assert sorted(t["learning_rate"] for t in trials) == [1e-3, 5e-3, 1e30]

    diverged = next(t for t in trials if t["learning_rate"] == 1e30)
    assert diverged["status"] == "failed" and "diverged" in diverged["error"]
    finished = [t for t in trials if t["status"] != "failed"]
    assert len(finished) == 2 and all(t["f1"] is not None and t["epochs_run"] >= 1 for t in finished)
    best = max(finished, key=lambda t: t["f1"])
    assert summary["best"]["learning_rate"] == best["learning_rate"]

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["learning_rate"] == best["learning_rate"] and metrics["f1"] == pytest.approx(best["f1"])
    model, tokenizer = load_model_and_tokenizer(str(tmp_path / "model"))
    assert model.config.num_hidden_layers == 2 and tokenizer.is_fast
    assert (tmp_path / "model" / "README.md").is_file() and (tmp_path / "predictions.json").is_file()

    table = capsys.readouterr().out
    assert "<- best" in table and "failed: " in table

    # Running the same search again resumes the finished experiment instead of training anew.
    assert lr_search.main(argv) == 0
    again = json.loads((tmp_path / "tune_results.json").read_text())
    assert [t["trial_id"] for t in again["trials"]] == [t["trial_id"] for t in trials]
    assert "resuming the search" in capsys.readouterr().out


def test_trials_keep_their_checkpoints_ranked_by_the_searched_metric(local_ray, tiny_model_dir, tmp_path):
    """--metric exact_match exports the best-EM epoch: Ray Train must keep checkpoints by EM, not F1."""
    from types import SimpleNamespace

    from train_job.config import TrainConfig
    from train_job.data import TrainingUnits
    from train_job.driver import build_trainer

    config = TrainConfig(model=str(tiny_model_dir), train_file=str(FIXTURES / "tiny-squad.jsonl"),
                         validation_file=str(FIXTURES / "tiny-squad.json"), output_dir=str(tmp_path)).validate()
    data = SimpleNamespace(train_units=TrainingUnits(np.full(8, 16), None, 2), train_features_ref=None,
                           validation_ref=None, validation_features_ref=None)
    for metric in ("f1", "exact_match"):
        trainer = build_trainer(config, data, name="t", storage_path=str(tmp_path), checkpoint_metric=metric)
        kept = trainer.run_config.checkpoint_config
        assert (kept.checkpoint_score_attribute, kept.checkpoint_score_order) == (metric, "max")
    assert not re.search(r"--mode\b", lr_search_help())


def lr_search_help() -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
        lr_search.main(["--help"])
    return buffer.getvalue()
