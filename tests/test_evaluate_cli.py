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
