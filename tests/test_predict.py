"""``python -m train_job.predict``: Ray Data batch answering and evaluation, against qa_common directly.

One local Ray and one tiny model (short windows, so the fixture contexts need several windows each)
for the module; the bad-input tests fail before Ray is touched.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import FIXTURES, build_tiny_model
from qa_common import QAConfig, Question, answer_questions, load_model_and_tokenizer, save_qa_config
from train_job import predict_data
from train_job.predict import main

SMALL_WINDOWS = QAConfig(max_length=48, stride=16, max_question_length=20)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = build_tiny_model(tmp_path_factory.mktemp("predict-model"))
    save_qa_config(SMALL_WINDOWS, directory)  # the actors read the windows from the model directory
    return directory


@pytest.fixture(scope="module")
def expected(model_dir, fixture_records):
    """``{id: best answer}`` from qa_common.answer_questions, one process, all questions together."""
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    answers = answer_questions(model.eval(), tokenizer, [Question(r["question"], r["context"]) for r in fixture_records],
                               SMALL_WINDOWS)
    return {record["id"]: best[0] for record, best in zip(fixture_records, answers)}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("concurrency, data", [(1, "official nested JSON"), (2, "gzipped JSON Lines")])
def test_predictions_equal_answer_questions_and_metrics_equal_the_evaluate_cli(
    local_ray, model_dir, expected, fixture_records, tmp_path, concurrency, data
):
    if data == "official nested JSON":
        path = FIXTURES / "tiny-squad.json"
    else:
        path = tmp_path / "questions.jsonl.gz"
        path.write_bytes(gzip.compress((FIXTURES / "tiny-squad.jsonl").read_bytes()))
    out = tmp_path / "out"
    # 4 questions per actor call: several calls, spread over the actors.
    assert main(["--model", str(model_dir), "--data", str(path), "--output", str(out),
                 "--concurrency", str(concurrency), "--batch-size", "4"]) == 0

    rows = read_jsonl(out / "predictions.jsonl")
    ids = [row["id"] for row in rows]
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids)) == len(fixture_records)
    for row in rows:
        want = expected[row["id"]]
        assert set(row) == {"id", *want}
        assert (row["answer"], row["start"], row["end"]) == (want["answer"], want["start"], want["end"]), row["id"]
        assert row["score"] == pytest.approx(want["score"], rel=1e-4, abs=1e-7)

    predictions = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    assert predictions == {row["id"]: row["answer"] for row in rows}
    evaluated = subprocess.run([sys.executable, "-m", "qa_common.evaluate", str(path), str(out / "predictions.json")],
                               capture_output=True, text=True, timeout=120)
    assert evaluated.returncode == 0, evaluated.stderr
    official = json.loads(evaluated.stdout)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    for name in ("exact_match", "f1", "precision", "recall"):
        assert metrics[name] == pytest.approx(official[name]), name
    assert metrics["total"] == official["total"] == len(fixture_records) and metrics["missing"] == 0
    assert metrics["f1"] > 0  # an untrained model still overlaps some gold answers: the sums are not all zero


def test_a_file_without_answers_gives_predictions_and_no_metrics(local_ray, model_dir, expected, tmp_path):
    records = [json.loads(line) for line in (FIXTURES / "tiny-squad.jsonl").read_text().splitlines()]
    path = tmp_path / "questions.parquet"
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("id", "question", "context")} for r in records]), path)
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--data", str(path), "--output", str(out), "--format", "parquet",
                 "--concurrency", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["predictions.parquet"]
    table = pq.read_table(out / "predictions.parquet")
    assert table.column_names == ["id", "answer", "score", "start", "end", "no_answer_probability"]
    rows = table.to_pylist()
    assert sorted(row["id"] for row in rows) == sorted(expected)
    assert all(row["answer"] == expected[row["id"]]["answer"] for row in rows)


def test_the_int8_onnx_backend_answers_as_its_runner_does(
    local_ray, model_dir, expected, fixture_records, tmp_path, capsys
):
    pytest.importorskip("onnx", reason="exporting needs the onnx package (the onnx extra, part of dev)")
    from qa_common.backends import load_runner
    from qa_common.export_onnx import main as export_main

    exported = tmp_path / "model"
    shutil.copytree(model_dir, exported)
    code, err = run(capsys, "--model", exported, "--data", FIXTURES / "tiny-squad.json", "--output", tmp_path / "o",
                    "--backend", "onnx-int8")
    assert code == 2 and "python -m qa_common.export_onnx" in err and "--int8" in err, err
    assert export_main([str(exported), "--int8"]) == 0
    runner, tokenizer, _ = load_runner(str(exported), "onnx-int8", threads=1)
    answers = answer_questions(runner, tokenizer, [Question(r["question"], r["context"]) for r in fixture_records],
                               SMALL_WINDOWS)
    want = {record["id"]: best[0] for record, best in zip(fixture_records, answers)}

    out = tmp_path / "out"
    assert main(["--model", str(exported), "--data", str(FIXTURES / "tiny-squad.json"), "--output", str(out),
                 "--concurrency", "1", "--backend", "onnx-int8"]) == 0
    rows = read_jsonl(out / "predictions.jsonl")
    assert sorted(row["id"] for row in rows) == sorted(want)
    for row in rows:
        assert (row["answer"], row["start"], row["end"]) == tuple(want[row["id"]][k] for k in ("answer", "start", "end"))
        assert row["score"] == pytest.approx(want[row["id"]]["score"], rel=1e-4, abs=1e-7)
    from_int8 = max(abs(row["score"] - want[row["id"]]["score"]) for row in rows)
    from_torch = max(abs(row["score"] - expected[row["id"]]["score"]) for row in rows)
    assert from_torch > 10 * max(from_int8, 1e-7), "the actors ran int8, not PyTorch"
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["backend"] == "onnx-int8"


def test_a_bad_record_past_the_checked_head_fails_in_the_actor_naming_file_and_id(
    local_ray, model_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(predict_data, "HEAD_RECORDS", 2)  # the driver checks lines 1-2; line 3 is the actors' to find
    lines = (FIXTURES / "tiny-squad.jsonl").read_text().splitlines()
    record = json.loads(lines[2])
    record["question"] = "   "
    lines[2] = json.dumps(record)
    path = tmp_path / "late-error.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code, err = run(capsys, "--model", model_dir, "--data", path, "--output", tmp_path / "out", "--concurrency", "1")
    assert code == 2
    assert f"error: {path}: record (id '{record['id']}'): empty question" in err
    assert not list((tmp_path / "out").iterdir()), "a run that failed leaves no partial predictions"


@pytest.mark.parametrize("problem, expected_error", [
    ("missing field", "{path}: line 3: missing field(s) question"),
    ("malformed JSON", "{path}: line 2: malformed JSON"),
    ("answer offset", "{path}: line 1 (id 'hh-1'): the answer"),
])
def test_a_malformed_file_exits_2_naming_file_and_record_before_ray_starts(
    model_dir, tmp_path, capsys, monkeypatch, problem, expected_error
):
    lines = (FIXTURES / "tiny-squad.jsonl").read_text().splitlines()
    if problem == "missing field":
        record = json.loads(lines[2])
        del record["question"]
        lines[2] = json.dumps(record)
    elif problem == "malformed JSON":
        lines[1] = lines[1][:40]
    else:
        record = json.loads(lines[0])
        record["answers"]["answer_start"] = [5]
        lines[0] = json.dumps(record)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("bad input must fail before Ray is used")

    monkeypatch.setattr(ray, "is_initialized", no_ray)
    monkeypatch.setattr(ray, "init", no_ray)
    code, err = run(capsys, "--model", model_dir, "--data", path, "--output", tmp_path / "out")
    assert code == 2
    assert expected_error.format(path=path) in err
    assert not (tmp_path / "out").exists()


def test_bad_paths_and_model_directories_exit_2(model_dir, tmp_path, capsys):
    data = FIXTURES / "tiny-squad.json"
    code, err = run(capsys, "--model", model_dir, "--data", tmp_path / "missing-*.jsonl", "--output", tmp_path / "o")
    assert code == 2 and "missing-*.jsonl: no such data file" in err
    (tmp_path / "notes.txt").write_text("x")
    code, err = run(capsys, "--model", model_dir, "--data", tmp_path / "notes.txt", "--output", tmp_path / "o")
    assert code == 2 and "notes.txt: unknown data format" in err
    code, err = run(capsys, "--model", tmp_path / "no-model", "--data", data, "--output", tmp_path / "o")
    assert code == 2 and "no-model" in err and "does not exist" in err
    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "config.json").write_text((model_dir / "config.json").read_text())
    code, err = run(capsys, "--model", empty, "--data", data, "--output", tmp_path / "o")
    assert code == 2 and "holds no model weights" in err


def test_inputs_resolve_from_globs_directories_and_file_uris(tmp_path):
    for name in ("b.jsonl", "a.json", "c.parquet", "skip.txt"):
        (tmp_path / name).write_text("")
    expected = [str(tmp_path / name) for name in ("a.json", "b.jsonl", "c.parquet")]
    assert predict_data.resolve_inputs([str(tmp_path)]) == expected
    assert predict_data.resolve_inputs([str(tmp_path / "*.json*"), str(tmp_path / "a.json")]) == expected[:2]
    assert predict_data.resolve_inputs([f"file://{tmp_path}"]) == [f"file://{path}" for path in expected]


def test_squad_v2_data_gives_the_same_keys_and_numbers_as_the_evaluate_cli(local_ray, model_dir, tmp_path):
    path = FIXTURES / "tiny-squad-v2.json"
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--data", str(path), "--output", str(out), "--batch-size", "4",
                 "--concurrency", "1"]) == 0
    evaluated = subprocess.run([sys.executable, "-m", "qa_common.evaluate", str(path), str(out / "predictions.json")],
                               capture_output=True, text=True, timeout=120)
    assert evaluated.returncode == 0, evaluated.stderr
    official = json.loads(evaluated.stdout)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert "NoAns_total" in official and official["NoAns_total"] > 0
    assert {name: metrics[name] for name in official} == pytest.approx(official)
    # Every key of the answers goes out (no_answer_probability included); the per-question scores do not.
    rows = read_jsonl(out / "predictions.jsonl")
    assert set(rows[0]) == {"id", "answer", "score", "start", "end", "no_answer_probability"}


def test_a_question_id_repeated_across_files_is_refused(local_ray, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run(capsys, "--model", model_dir, "--data", FIXTURES / "tiny-squad.json", FIXTURES / "tiny-squad.jsonl",
                    "--output", out, "--batch-size", "4", "--concurrency", "1")
    assert code == 2 and "occurs more than once" in err
    assert not (out / "predictions.jsonl").exists() and not (out / "metrics.json").exists()
