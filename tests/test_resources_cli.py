"""A run that cannot fit the cluster exits 2 in seconds, saying what fits (a Ray with 2 CPUs of its own)."""

import subprocess
import sys

import pytest

from conftest import FIXTURES


@pytest.fixture(scope="module")
def two_cpu_ray_address(isolated_from_ray):
    import ray

    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.mark.parametrize("command, cpus, message", [
    ("train_job", "2.1", "the run needs 2.1 CPUs (1 worker(s) x 2.1 CPUs); this cluster has 2: use --cpus-per-worker 2"),
    ("train_job.tune", "2", "each trial needs 2.1 CPUs (1 worker(s) x 2 CPUs + 0.1 for the trial driver); "
                            "this cluster has 2: use --cpus-per-worker 1.9"),
])
def test_a_run_that_cannot_fit_exits_2_saying_what_fits(two_cpu_ray_address, tiny_model_dir, tmp_path, command, cpus,
                                                        message):
    result = subprocess.run(
        [sys.executable, "-m", command, "--address", two_cpu_ray_address, "--model", str(tiny_model_dir),
         "--train-file", str(FIXTURES / "tiny-squad.jsonl"), "--validation-file", str(FIXTURES / "tiny-squad.json"),
         "--output-dir", str(tmp_path), "--max-length", "48", "--stride", "16", "--max-question-length", "20",
         "--num-workers", "1", "--cpus-per-worker", cpus, "--lr-grid" if command.endswith("tune") else "--epochs", "1"],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: {message}" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "checkpoints").exists()
