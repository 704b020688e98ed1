"""End-to-end training on CPU Ray workers with a tiny model and the fixture data."""

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import FIXTURES
from qa_common import QAConfig, Question, answer_questions, load_model_and_tokenizer, read_squad, squad_metrics
from train_job.allocator import tcmalloc_library
from train_job.config import TrainConfig
from train_job.data import TrainingUnits
from train_job.run import run


def tiny_config(model_dir, output_dir, **overrides) -> TrainConfig:
    values = dict(
        model=str(model_dir), train_file=str(FIXTURES / "tiny-squad.jsonl"),
        validation_file=str(FIXTURES / "tiny-squad.json"), output_dir=str(output_dir), num_workers=2,
        epochs=3, learning_rate=3e-3, warmup_ratio=0.0, per_device_batch_size=4,
        qa=QAConfig(max_length=48, stride=16, max_question_length=20), max_failures=0,
        # The squad-minilm preset's dropout, and the backward that recomputes each layer; the abstaining run
        # (conftest) trains with PyTorch's dropout and keeps its activations.
        cheap_dropout=True, gradient_checkpointing=True,
    )
    values.update(overrides)
    return TrainConfig(**values).validate()


def test_two_workers_train_evaluate_and_export(uninterrupted):
    output_dir, metrics = uninterrupted

    history = metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    for name in ("metrics.json", "predictions.json", "train_config.json", "model/README.md", "model/config.json",
                 "model/qa_config.json"):
        assert (output_dir / name).is_file(), name

    saved = json.loads((output_dir / "metrics.json").read_text())
    predictions = json.loads((output_dir / "predictions.json").read_text())
    references = {r["id"]: r["answers"]["text"] for r in read_squad(FIXTURES / "tiny-squad.json")}
    assert set(predictions) == set(references)
    recomputed = squad_metrics(predictions, references)
    for name in ("exact_match", "f1", "precision", "recall"):
        assert saved[name] == pytest.approx(recomputed[name])
    assert saved["num_workers"] == 2 and saved["eval_examples"] == len(references)
    assert saved["training_dropout"] == "cheap" and "fp32, cheap dropout)" in (output_dir / "model/README.md").read_text()
    assert saved["gradient_checkpointing"] is True
    assert saved["sparse_lookup_gradient"] is True  # all-reduced sparse between the two workers (Gloo)
    # --allocator auto: the workers preloaded tcmalloc where it is installed (CI installs it)
    assert saved["allocator"] == ("tcmalloc" if tcmalloc_library() else "glibc")
    assert "gradient_checkpointing" not in json.loads((output_dir / "model/config.json").read_text())
    assert saved["train_samples_per_second"] > 0 and saved["train_runtime_s"] > 0
    assert f"| {saved['exact_match']:.2f} | {saved['f1']:.2f} |" in (output_dir / "model/README.md").read_text()
    # --export-onnx: both ONNX files, measured on the run's own validation split, in the card too
    exported = json.loads((output_dir / "model/onnx_export.json").read_text())
    assert exported["validation"]["file"] == "tiny-squad.json" and exported["torch"]["f1"] == pytest.approx(saved["f1"])
    assert (output_dir / "model/model.onnx").is_file() and (output_dir / "model/model.int8.onnx").is_file()
    assert "## ONNX Runtime backends" in (output_dir / "model/README.md").read_text()

    model, tokenizer = load_model_and_tokenizer(str(output_dir / "model"))
    record = read_squad(FIXTURES / "tiny-squad.jsonl")[0]
    [answers] = answer_questions(model, tokenizer, [Question(record["question"], record["context"])],
                                 QAConfig(max_length=48, stride=16, max_question_length=20))
    assert record["context"][answers[0]["start"]:answers[0]["end"]] == answers[0]["answer"]


def test_two_workers_with_one_validation_question_report_what_one_process_answers(local_ray, tiny_model_dir, tmp_path):
    # One worker evaluates no question: it must neither hang the other nor change the scores, which
    # must be those of the exported model answering the same question in this process. Its batches are
    # also cut into parts (--max-batch-tokens): DDP all-reduces once per step, after the last part,
    # with DDP's join for a last step one worker may not take.
    metrics = run(tiny_config(tiny_model_dir, tmp_path, epochs=1, max_eval_samples=1, max_batch_tokens=96,
                              allocator="glibc"))
    assert metrics["history"][-1]["train_features_seen"] == metrics["train_features"] and metrics["eval_examples"] == 1
    assert metrics["max_batch_tokens"] == 96 and np.isfinite(metrics["train_loss"])
    assert metrics["allocator"] == "glibc"  # glibc asked for: nothing preloaded
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    [record] = [r for r in read_squad(FIXTURES / "tiny-squad.json") if r["id"] in predictions]
    model, tokenizer = load_model_and_tokenizer(str(tmp_path / "model"))
    [answers] = answer_questions(model.eval(), tokenizer, [Question(record["question"], record["context"])],
                                 QAConfig(max_length=48, stride=16, max_question_length=20))
    assert predictions == {record["id"]: answers[0]["answer"]}
    expected = squad_metrics(predictions, {record["id"]: record["answers"]["text"]})
    for name in ("exact_match", "f1", "precision", "recall"):
        assert metrics[name] == pytest.approx(expected[name])


@pytest.fixture(scope="module")
def uninterrupted(local_ray, tiny_model_dir, tmp_path_factory):
    """Two epochs on two workers without a failure, both trackers on, exported with ONNX too: what the
    export is checked on, and what resumed runs must match."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    return output_dir, run(tiny_config(tiny_model_dir, output_dir, epochs=2, report_to="tensorboard,mlflow",
                                       export_onnx=True))


def checkpoint_dirs(output_dir) -> list:
    """The run's checkpoints, oldest first (their names hold the time they were written)."""
    return sorted(p for p in (output_dir / "checkpoints" / "train").glob("checkpoint_*") if p.is_dir())


def assert_same_run(resumed: dict, uninterrupted: dict) -> None:
    assert [h["step"] for h in resumed["history"]] == [h["step"] for h in uninterrupted["history"]]
    for ours, theirs in zip(resumed["history"], uninterrupted["history"]):
        for name in ("train_loss", "exact_match", "f1"):
            assert ours[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-5), name


def test_a_run_killed_after_an_epoch_then_mid_epoch_resumes_each_time_to_the_same_result(uninterrupted, tiny_model_dir,
                                                                                          tmp_path):
    """One run killed twice: after its first epoch, then (resumed from that epoch's checkpoint) at step 3
    of epoch 2, one step after a mid-epoch checkpoint; resumed again, it ends as the run never killed."""
    from ray.train import TrainingFailedError

    from train_job.checkpoint import read_training_state
    from train_job.config import TrainJobError

    def fail_after_first_epoch(epoch: int, *, resumed: bool) -> None:  # nested: pickled by value for the workers
        if epoch == 1 and not resumed:
            raise RuntimeError("injected fault after epoch 1")

    def fail_in_second_epoch(epoch: int, step_in_epoch: int, *, resumed: bool) -> None:
        if (epoch, step_in_epoch) == (2, 3):
            raise RuntimeError("injected fault at epoch 2 step 3")

    config = tiny_config(tiny_model_dir, tmp_path, epochs=2, checkpoint_every_steps=2)
    with pytest.raises(TrainingFailedError):
        run(config, after_epoch=fail_after_first_epoch)
    state = read_training_state(checkpoint_dirs(tmp_path)[-1])
    assert (state["epoch"], state["step_in_epoch"]) == (1, 0)
    assert not (tmp_path / "metrics.json").exists()

    # Other settings into the same run directory: refused, naming the change.
    with pytest.raises(TrainJobError, match=r"settings.learning_rate: 0.003 -> 7e-05.*--overwrite"):
        run(tiny_config(tiny_model_dir, tmp_path, epochs=2, checkpoint_every_steps=2, learning_rate=7e-5))

    with pytest.raises(TrainingFailedError):  # the same settings resume by themselves
        run(config, after_step=fail_in_second_epoch)
    state = read_training_state(checkpoint_dirs(tmp_path)[-1])
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2) and len(state["rng"]) == 2

    metrics = run(tiny_config(tiny_model_dir, tmp_path, epochs=2, checkpoint_every_steps=2, resume=True))
    assert_same_run(metrics, uninterrupted[1])
    assert metrics["learning_rate"] == 3e-3 and metrics["fingerprint"]["settings"]["learning_rate"] == 3e-3


def test_trackers_record_the_runs_scalars(uninterrupted):
    import sqlite3

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir, metrics = uninterrupted
    events = EventAccumulator(str(output_dir / "tensorboard" / "train"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/loss", "train/learning_rate", "train/windows_per_s", "eval/exact_match", "eval/f1"):
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("eval/f1")] == [h["step"] for h in metrics["history"]]
    assert events.Scalars("eval/f1")[-1].value == pytest.approx(metrics["history"][-1]["f1"])

    pytest.importorskip("mlflow")
    with sqlite3.connect(output_dir / "mlflow.db") as db:
        params = dict(db.execute("select key, value from params"))
        f1 = [row[0] for row in db.execute("select value from metrics where key = 'eval_f1' order by step")]
    assert float(params["learning_rate"]) == 3e-3 and params["max_length"] == "48"
    assert f1 == pytest.approx([h["f1"] for h in metrics["history"]])


def test_workers_that_cannot_start_fail_the_run_with_the_reason(local_ray, tmp_path):
    from ray.train import TrainingFailedError

    from train_job.driver import build_trainer, startup_failure

    config = tiny_config(tmp_path, tmp_path, num_workers=5, worker_start_timeout_s=2)  # 5 CPUs on a 4-CPU Ray
    data = SimpleNamespace(train_units=TrainingUnits(np.full(10, 16), None, 2), train_features_ref=None,
                           validation_ref=None, validation_features_ref=None)
    trainer = build_trainer(config, data, name="never-starts", storage_path=str(tmp_path))
    with pytest.raises(TrainingFailedError) as failure:
        trainer.fit()
    reason = startup_failure(failure.value, config)
    assert reason is not None and "could not start within --worker-start-timeout-s 2" in str(reason)


def test_ray_datas_statistics_actor_stops_after_featurising_and_starts_again_when_next_needed(
        local_ray, tiny_model_dir, tmp_path):
    import ray
    import ray.data
    from ray.data._internal.stats import STATS_ACTOR_NAME, STATS_ACTOR_NAMESPACE

    from train_job.data import load_splits
    from train_job.driver import PreparedData
    from train_job.ray_cluster import stop_ray_data_stats_actor

    def alive() -> bool:
        try:
            ray.get_actor(STATS_ACTOR_NAME, namespace=STATS_ACTOR_NAMESPACE)
            return True
        except ValueError:
            return False

    def pipeline() -> list:
        return sorted(row["id"] for row in ray.data.range(8).map_batches(lambda batch: batch).take_all())

    def stopped() -> bool:
        deadline = time.monotonic() + 30
        while alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        return not alive()

    config = tiny_config(tiny_model_dir, tmp_path)
    PreparedData(config, *load_splits(config), own_ray=False)  # featurised on a Ray the job did not start: kept
    assert alive()
    assert PreparedData(config, *load_splits(config), own_ray=True).train_feature_count > 0 and stopped()
    assert pipeline() == list(range(8)) and alive()
    stop_ray_data_stats_actor()
    assert stopped()


BAD_INPUT = [
    (["--train-file", "missing.jsonl", "--validation-file", str(FIXTURES / "tiny-squad.json")], "no such data file"),
    (["--train-file", str(FIXTURES / "../conftest.py"), "--validation-file", str(FIXTURES / "tiny-squad.json")], "unknown data format"),
    (["--train-file", "BAD_ANSWER", "--validation-file", str(FIXTURES / "tiny-squad.json")], "does not match the context"),
    (["--stride", "500"], "stride"),
    (["--num-workers", "0"], "--num-workers must be positive"),
    (["--max-batch-tokens", "0"], "--max-batch-tokens must be positive"),
    (["--precision", "fp16"], "fp16 needs --use-gpu"),
    (["--no-such-flag"], "unrecognized arguments"),
]


def bad_input_flags(tmp_path, flags: list[str]) -> list[str]:
    bad = tmp_path / "bad.jsonl"
    line = json.loads((FIXTURES / "tiny-squad.jsonl").read_text().splitlines()[0])
    line["answers"]["answer_start"] = [3]
    bad.write_text(json.dumps(line) + "\n")
    return ["--output-dir", str(tmp_path / "out"), *(str(bad) if flag == "BAD_ANSWER" else flag for flag in flags)]


@pytest.mark.parametrize("flags, message", BAD_INPUT)
def test_bad_input_fails_before_any_worker_starts(tmp_path, capsys, monkeypatch, flags, message):
    import ray

    from train_job.__main__ import main

    def no_ray(*args, **kwargs):
        raise AssertionError("bad input must fail before Ray is used")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray, "is_initialized", no_ray)
    try:
        code = main(bad_input_flags(tmp_path, flags))
    except SystemExit as exited:  # a usage error: argparse exits
        code = exited.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_command_exits_2_on_bad_input_without_starting_ray(tmp_path):
    flags, message = BAD_INPUT[2]
    result = subprocess.run([sys.executable, "-m", "train_job", *bad_input_flags(tmp_path, flags)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Ray" not in result.stderr and not (tmp_path / "out").exists()


def test_a_second_stage_starts_from_the_first_stages_qa_head(abstaining_run, local_ray, tmp_path):
    """Two-stage training (SQuAD, then the hospital's data): ``--model`` of a trained QA model keeps its
    head. Stage one is the session's trained abstaining model (conftest); with a learning rate too small
    to move anything, stage two exports stage one's head."""
    import torch

    def head(directory) -> torch.Tensor:
        model, _ = load_model_and_tokenizer(str(directory))
        return model.qa_outputs.weight.detach().clone()

    stage1 = abstaining_run[0] / "model"
    # Given relative to here, as `--model runs/.../model` is: the workers run in other directories.
    run(tiny_config(os.path.relpath(stage1), tmp_path / "stage2", num_workers=1, epochs=1, learning_rate=1e-12,
                    train_file=str(FIXTURES / "tiny-squad.json")))
    first, second, untrained = head(stage1), head(tmp_path / "stage2" / "model"), head(abstaining_run[0].parent / "tiny")
    assert not torch.allclose(first, untrained, atol=1e-4)  # stage one trained the head...
    assert torch.allclose(second, first, atol=1e-6)  # ...and stage two started from it, not from a new one
    card = (tmp_path / "stage2" / "model" / "README.md").read_text()
    assert str(stage1) in card  # the card names the model it was fine-tuned from
