"""A run that cannot fit the cluster exits 2 in seconds, saying what fits (a Ray with 2 CPUs of its own),
and the pools of actors the batch commands size to the cluster and their work."""

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


def test_an_actor_pool_holds_what_the_cluster_fits_and_no_more_actors_than_batches():
    from argparse import Namespace

    from train_job.ray_cluster import ActorPool

    default = Namespace(concurrency=None, cpus_per_actor=1, num_gpus_per_actor=0, batch_size=10)
    assert ActorPool.fit(default, {"CPU": 4}).actors == 4  # the work's size unknown: every actor that fits
    assert [ActorPool.fit(default, {"CPU": 4}, items=n).actors for n in (0, 10, 21, 90)] == [1, 1, 3, 4]
    asked = Namespace(concurrency=3, cpus_per_actor=1, num_gpus_per_actor=0, batch_size=10)
    assert ActorPool.fit(asked, {"CPU": 4}, items=10).actors == 3  # --concurrency is taken as given
    with pytest.raises(ValueError, match=r"holds 1 actor\(s\) of 2 CPU\(s\) and 0 GPU\(s\), not 3"):
        ActorPool.fit(Namespace(concurrency=3, cpus_per_actor=2, num_gpus_per_actor=0, batch_size=10), {"CPU": 3})
    gpus = Namespace(concurrency=None, cpus_per_actor=1, num_gpus_per_actor=1, batch_size=10)
    assert ActorPool.fit(gpus, {"CPU": 8, "GPU": 2}, items=50).actors == 2


def test_a_ray_the_job_starts_itself_runs_lighter_and_a_joined_one_is_left_as_it_is(monkeypatch):
    import os

    import ray

    from train_job import ray_cluster

    calls = []
    monkeypatch.setattr(os, "environ", {"RAY_event_stats": "1"})  # a user's own value wins
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **options: calls.append((address, dict(os.environ))))
    assert ray_cluster.connect_ray("10.0.0.1:6379") is False
    assert calls[-1] == ("10.0.0.1:6379", {"RAY_event_stats": "1"})
    assert ray_cluster.connect_ray(None) is True
    assert calls[-1] == (None, {"RAY_event_stats": "1", "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0"})
    os.environ.clear()
    os.environ["RAY_ADDRESS"] = "auto"
    assert ray_cluster.connect_ray(None) is False and calls[-1] == ("auto", {"RAY_ADDRESS": "auto"})
