"""The serving bench scripts run end to end with a tiny model and tiny settings, and write valid JSON.

Each starts and stops a local Ray and Serve of its own, so each runs as a subprocess (HTTP on 127.0.0.1
only) with a hard timeout, with no Ray of this process beside it; the figures themselves are not
checked, only that they are there.
"""

import subprocess
import sys

import pytest
from bench_helpers import REPO, check_document

from conftest import FIXTURES

pytestmark = pytest.mark.usefixtures("isolated_from_ray")


def run_bench(script: str, out, *flags: str, timeout: int = 240) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{script}", "--out", str(out), *flags],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return check_document(out, result.stdout)


def test_serve_load(tiny_model_dir, tmp_path):
    document = run_bench(
        "serve_load", tmp_path / "serve.json",
        "--model", str(tiny_model_dir), "--data", str(FIXTURES / "tiny-squad.jsonl"),
        "--requests", "24", "--concurrency", "4", "--warmup", "2", "--max-batch-size", "4", "--cpus", "2",
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


def test_cold_start(tiny_model_dir, tmp_path):
    document = run_bench(
        "cold_start", tmp_path / "cold.json",
        "--model", str(tiny_model_dir), "--repeats", "1", "--cpus", "2", "--replica-cpus", "0.5",
    )
    [row] = document["results"]["cold_starts"]
    assert 0 < row["next_request_s"] < row["time_to_first_answer_s"]
    assert document["ratios"]["cold_start_median_s"] > 0


def test_serve_soak(tiny_model_dir, tmp_path):
    document = run_bench(
        "serve_soak", tmp_path / "soak.json",
        "--model", str(tiny_model_dir), "--data", str(FIXTURES / "tiny-squad.jsonl"), "--clients", "4",
        "--duration-s", "8", "--long-every", "3", "--long-chars", "2000", "--kill-at-s", "3", "--cpus", "2",
        "--replica-cpus", "0.5",
    )
    soak = document["results"]["soak"]
    assert soak["answered"] > 0 and soak["answered_long"] > 0 and soak["killed_at_s"] >= 3
    assert soak["outside_200_503"] == 0 and soak["offset_mismatches"] == 0
    assert soak["replicas_after"] == {"RUNNING": 1}
