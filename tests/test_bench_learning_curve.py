"""bench.learning_curve keeps each measured point and reads it back instead of training again."""

import argparse
import json

from bench import learning_curve


def test_a_measured_point_is_read_not_run_again(tmp_path, monkeypatch):
    recorded = {"questions": 2000, "sample": "spread", "dev_f1": 39.59}
    (tmp_path / "2000").mkdir()
    (tmp_path / "2000" / learning_curve.POINT).write_text(json.dumps(recorded))

    def must_not_run(command):
        raise AssertionError(f"ran {command}")

    monkeypatch.setattr(learning_curve, "timed", must_not_run)
    args = argparse.Namespace(runs_dir=tmp_path)
    assert learning_curve.run_point(2000, "spread", args) == recorded


def test_the_preset_row_comes_from_its_recorded_training_and_dev_results():
    row = learning_curve.preset_row()
    trained = json.loads(learning_curve.PRESET_TRAIN.read_text())
    dev = json.loads(learning_curve.PRESET_DEV.read_text())["results"]["dev"]
    assert row["questions"] == trained["metrics"]["fingerprint"]["settings"]["max_train_samples"]
    assert row["train_command_s"] == trained["whole_command_wall_s"]
    assert row["dev_f1"] == round(dev["served"]["f1"], 2)
    assert row["dev_f1_always_answering"] == round(dev["always_answering"]["f1"], 2)
