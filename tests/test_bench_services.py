"""The serving bench scripts run end to end with a tiny model and tiny settings, and write valid JSON.

They run in this process on the session's Ray and Serve, as the other bench scripts do, each deploying
the service under its packaged name and deleting it after; the figures themselves are not checked,
only that they are there.
"""

import pytest
from bench_helpers import run_bench

from conftest import FIXTURES
from serve_app.app import APP_NAME

pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture
def leaves_no_application():
    """What the bench deployed is gone after it: the next module's Serve is as it found it."""
    from ray import serve

    yield
    assert APP_NAME not in serve.status().applications


def test_serve_load(tiny_model_dir, tmp_path, capsys, leaves_no_application):
    document = run_bench(
        "serve_load", tmp_path / "serve.json", capsys,
        "--model", str(tiny_model_dir), "--data", str(FIXTURES / "tiny-squad.jsonl"),
        "--requests", "24", "--concurrency", "4", "--warmup", "2", "--max-batch-size", "4",
        "--replica-cpus", "0.5", "--time-limit-s", "90",
    )
    modes = {row["mode"]: row for row in document["results"]["modes"]}
    assert set(modes) == {"batched", "unbatched"}
    for row in modes.values():
        assert row["answered"] == 24 and row["errors"] == 0
        assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["windows_per_s"] >= row["requests_per_s"] > 0
    assert modes["unbatched"]["questions_per_model_call"] == 1
    assert document["ratios"]["batched_vs_unbatched_requests_per_s"] > 0


def test_cold_start(tiny_model_dir, tmp_path, capsys, leaves_no_application):
    document = run_bench(
        "cold_start", tmp_path / "cold.json", capsys,
        "--model", str(tiny_model_dir), "--repeats", "1", "--replica-cpus", "0.5",
    )
    [row] = document["results"]["cold_starts"]
    assert 0 < row["next_request_s"] < row["time_to_first_answer_s"]
    assert document["ratios"]["cold_start_median_s"] > 0


def test_serve_soak(tiny_model_dir, tmp_path, capsys, leaves_no_application):
    document = run_bench(
        "serve_soak", tmp_path / "soak.json", capsys,
        "--model", str(tiny_model_dir), "--data", str(FIXTURES / "tiny-squad.jsonl"), "--clients", "4",
        "--duration-s", "8", "--long-every", "3", "--long-chars", "2000", "--kill-at-s", "3",
        "--replica-cpus", "0.5",
    )
    soak = document["results"]["soak"]
    assert soak["answered"] > 0 and soak["answered_long"] > 0 and soak["killed_at_s"] >= 3
    assert soak["outside_200_503"] == 0 and soak["offset_mismatches"] == 0
    assert soak["replicas_after"] == {"RUNNING": 1} and document["ratios"]["replica_replaced"] is True
