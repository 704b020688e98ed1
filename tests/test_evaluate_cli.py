import json
import subprocess
import sys

import pytest

from conftest import FIXTURES


def _run(tmp_path, predictions):
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps(predictions))
    return subprocess.run(
        [sys.executable, "-m", "qa_common.evaluate", str(FIXTURES / "tiny-squad.json"), str(path)],
        capture_output=True, text=True,
    )


def test_prints_official_style_metrics_and_reports_missing_ids(tmp_path):
    records = [json.loads(line) for line in (FIXTURES / "tiny-squad.jsonl").read_text().splitlines()]
    predictions = {r["id"]: r["answers"]["text"][0] for r in records[:-1]}
    predictions["hh-1"] = "hand hygiene is the"  # 2 of 4 tokens right after normalisation
    result = _run(tmp_path, predictions)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["total"] == 13 and metrics["missing"] == 1
    assert metrics["exact_match"] == pytest.approx(100 * 11 / 13)
    assert metrics["f1"] == pytest.approx(100 * (11 + 2 * 1.0 * (2 / 3) / (1 + 2 / 3)) / 13)
    assert "1 of 13 questions have no prediction" in result.stderr


def test_unknown_ids_are_an_error(tmp_path):
    result = _run(tmp_path, {"no-such-id": "x"})
    assert result.returncode == 2
    assert "not in the data: 'no-such-id'" in result.stderr


def test_v2_data_gives_the_squad_v2_metrics(tmp_path):
    from qa_common import read_squad, squad_v2_metrics

    references = {r["id"]: r["answers"]["text"] for r in read_squad(FIXTURES / "tiny-squad-v2.json")}
    predictions = {qid: golds[0] if golds else "" for qid, golds in references.items()}
    predictions["wa-x1"] = "alcohol"  # a span for an unanswerable question
    na_probs = {qid: 0.1 for qid in references} | {"wa-x1": 0.9}
    (tmp_path / "predictions.json").write_text(json.dumps(predictions))
    (tmp_path / "na.json").write_text(json.dumps(na_probs))
    command = [sys.executable, "-m", "qa_common.evaluate", str(FIXTURES / "tiny-squad-v2.json"),
               str(tmp_path / "predictions.json")]
    plain = subprocess.run(command, capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr
    metrics = json.loads(plain.stdout)
    assert metrics == pytest.approx(squad_v2_metrics(predictions, references))
    assert metrics["NoAns_exact"] == pytest.approx(80.0) and metrics["HasAns_exact"] == 100.0
    assert "best_f1" not in metrics
    with_probs = json.loads(subprocess.run(command + ["--na-prob-file", str(tmp_path / "na.json")],
                                           capture_output=True, text=True, check=True).stdout)
    assert with_probs["best_f1"] == 100.0 and with_probs["best_f1_thresh"] == 0.1
