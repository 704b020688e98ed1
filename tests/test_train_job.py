"""End-to-end training on CPU Ray workers with a tiny model and the fixture data."""

import json
import subprocess
import sys

import pytest

from conftest import FIXTURES
from qa_common import QAConfig, Question, answer_questions, load_model_and_tokenizer, read_squad, squad_metrics
from train_job.config import TrainConfig
from train_job.run import run


def tiny_config(model_dir, output_dir, **overrides) -> TrainConfig:
    values = dict(
        model=str(model_dir), train_file=str(FIXTURES / "tiny-squad.jsonl"),
        validation_file=str(FIXTURES / "tiny-squad.json"), output_dir=str(output_dir), num_workers=2,
        epochs=3, learning_rate=3e-3, warmup_ratio=0.0, per_device_batch_size=4,
        qa=QAConfig(max_length=48, stride=16, max_question_length=20), max_failures=0,
    )
    values.update(overrides)
    return TrainConfig(**values).validate()


def test_two_workers_train_evaluate_and_export(local_ray, tiny_model_dir, tmp_path):
    metrics = run(tiny_config(tiny_model_dir, tmp_path, export_onnx=True))

    history = metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    for name in ("metrics.json", "predictions.json", "train_config.json", "model/README.md", "model/config.json",
                 "model/qa_config.json"):
        assert (tmp_path / name).is_file(), name

    saved = json.loads((tmp_path / "metrics.json").read_text())
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    references = {r["id"]: r["answers"]["text"] for r in read_squad(FIXTURES / "tiny-squad.json")}
    assert set(predictions) == set(references)
    recomputed = squad_metrics(predictions, references)
    for name in ("exact_match", "f1", "precision", "recall"):
        assert saved[name] == pytest.approx(recomputed[name])
    assert saved["num_workers"] == 2 and saved["eval_examples"] == len(references)
    assert saved["train_samples_per_second"] > 0 and saved["train_runtime_s"] > 0
    assert f"| {saved['exact_match']:.2f} | {saved['f1']:.2f} |" in (tmp_path / "model/README.md").read_text()
    # --export-onnx: both ONNX files, measured on the run's own validation split, in the card too
    exported = json.loads((tmp_path / "model/onnx_export.json").read_text())
    assert exported["validation"]["file"] == "tiny-squad.json" and exported["torch"]["f1"] == pytest.approx(saved["f1"])
    assert (tmp_path / "model/model.onnx").is_file() and (tmp_path / "model/model.int8.onnx").is_file()
    assert "## ONNX Runtime backends" in (tmp_path / "model/README.md").read_text()

    model, tokenizer = load_model_and_tokenizer(str(tmp_path / "model"))
    record = read_squad(FIXTURES / "tiny-squad.jsonl")[0]
    [answers] = answer_questions(model, tokenizer, [Question(record["question"], record["context"])],
                                 QAConfig(max_length=48, stride=16, max_question_length=20))
    assert record["context"][answers[0]["start"]:answers[0]["end"]] == answers[0]["answer"]


def test_one_and_two_workers_see_the_same_training_features(local_ray, tiny_model_dir, tmp_path):
    seen = {}
    for workers in (1, 2):
        metrics = run(tiny_config(tiny_model_dir, tmp_path / str(workers), num_workers=workers, epochs=1))
        seen[workers] = metrics["history"][-1]
        assert metrics["train_features"] > 0
    assert seen[1]["train_features_seen"] == seen[2]["train_features_seen"] == metrics["train_features"]


def test_a_failed_run_resumes_from_its_last_checkpoint(local_ray, tiny_model_dir, tmp_path):
    from ray.train import TrainingFailedError

    def fail_after_first_epoch(epoch: int, *, resumed: bool) -> None:  # nested: pickled by value for the workers
        if epoch == 1 and not resumed:
            raise RuntimeError("injected fault after epoch 1")

    config = tiny_config(tiny_model_dir, tmp_path, epochs=2, num_workers=1)
    with pytest.raises(TrainingFailedError):
        run(config, after_epoch=fail_after_first_epoch)
    assert list((tmp_path / "checkpoints" / "train").glob("checkpoint_*"))
    assert not (tmp_path / "metrics.json").exists()

    metrics = run(config)
    steps_per_epoch = metrics["history"][0]["step"]
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["history"][1]["step"] == 2 * steps_per_epoch  # continued, not restarted at step 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--train-file", "missing.jsonl", "--validation-file", str(FIXTURES / "tiny-squad.json")], "no such data file"),
        (["--train-file", str(FIXTURES / "../conftest.py"), "--validation-file", str(FIXTURES / "tiny-squad.json")], "unknown data format"),
        (["--train-file", "BAD_ANSWER", "--validation-file", str(FIXTURES / "tiny-squad.json")], "does not match the context"),
        (["--stride", "500"], "stride"),
        (["--num-workers", "0"], "--num-workers must be positive"),
        (["--precision", "fp16"], "fp16 needs --use-gpu"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_bad_input_fails_before_any_worker_starts(tmp_path, flags, message):
    bad = tmp_path / "bad.jsonl"
    line = json.loads((FIXTURES / "tiny-squad.jsonl").read_text().splitlines()[0])
    line["answers"]["answer_start"] = [3]
    bad.write_text(json.dumps(line) + "\n")
    flags = [str(bad) if flag == "BAD_ANSWER" else flag for flag in flags]
    result = subprocess.run(
        [sys.executable, "-m", "train_job", "--output-dir", str(tmp_path / "out"), *flags],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Ray" not in result.stderr and not (tmp_path / "out").exists()
