"""A real multi-node Ray cluster on one machine runs jobs submitted with `ray job submit`: training, and
batch answering with ``train_job.predict``.

``cluster/local-cluster.sh`` (what cluster/README.md tells users to run) starts a head node and a
worker node as two separate ``ray start`` processes, on free ports and in a temp dir of their own.
Each node offers 3 CPUs and each of the 2 Ray Train workers needs 2, so the workers only fit on
different nodes. The job ships the checkout with ``--working-dir`` (the runtime_env carries the
project), reads its data from the working dir, and writes checkpoints to ``--storage-path``. The
test then checks that the job succeeded and that its workers ran on both nodes: the node ids the
workers report in metrics.json (``worker_node_ids``, in rank order), and Ray's own record of the
RayTrainWorker actors.

The cluster is stopped by the script's ``stop`` (it kills only the process groups it started,
never ``ray stop``), with the recorded process groups killed here as a last resort.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local-cluster.sh"
HEAD_CPUS = WORKER_CPUS = 3
CPUS_PER_TRAIN_WORKER = 2  # > half a node: two workers cannot share one
SUBMISSION_ID = "rqa-two-node-train"

pytestmark = [pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("setsid") is None or shutil.which("bash") is None,
    reason="the local cluster script needs Linux, bash and setsid",
), pytest.mark.usefixtures("isolated_from_ray")]

# Reads the cluster's state through the dashboard (no driver joins the cluster from this process).
STATE_QUERY = """
import json, sys
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors, list_nodes
address, submission_id = sys.argv[1:]
nodes = [{"node_id": n.node_id, "is_head_node": n.is_head_node, "state": n.state,
          "cpus": n.resources_total.get("CPU")} for n in list_nodes(address=address, timeout=60)]
job = None
if submission_id:
    info = JobSubmissionClient(address).get_job_info(submission_id)
    job = {"status": str(info.status), "job_id": info.job_id, "runtime_env": info.runtime_env}
actors = [{"node_id": a.node_id, "job_id": a.job_id} for a in
          list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")], timeout=60, detail=True)]
print(json.dumps({"nodes": nodes, "job": job, "train_workers": actors}))
"""


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LocalCluster:
    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        gcs_port, dashboard_port, client_port = free_ports(3)
        self.dashboard = f"http://127.0.0.1:{dashboard_port}"
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")},
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),  # this venv's python and ray, on every node
            "PYTHON": sys.executable,
            "RAY": str(Path(bin_dir) / "ray"),
            "RQA_CLUSTER_DIR": str(state_dir),
            "RQA_GCS_PORT": str(gcs_port),
            "RQA_DASHBOARD_PORT": str(dashboard_port),
            "RQA_CLIENT_PORT": str(client_port),
            "RQA_HEAD_CPUS": str(HEAD_CPUS),
            "RQA_WORKER_CPUS": str(WORKER_CPUS),
            "RQA_WORKER_NODES": "1",
            "RQA_START_TIMEOUT_S": "150",
            "RQA_STOP_TIMEOUT_S": "10",
            # Ray's token authentication, as the script turns it on, with a token of this cluster's own
            # (never ~/.ray's): nodes and clients share it.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
        }

    def script(self, command: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), command], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def state(self, submission_id: str = "") -> dict:
        result = subprocess.run([sys.executable, "-c", STATE_QUERY, self.dashboard, submission_id], env=self.env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    def kill_recorded_groups(self) -> None:
        """Last resort: SIGKILL the process groups of the nodes the script recorded (ours only)."""
        for pid_file in (self.state_dir / "pids").glob("*.pid"):
            try:
                os.killpg(int(pid_file.read_text().strip()), signal.SIGKILL)
            except (ValueError, ProcessLookupError, PermissionError):
                pass


@pytest.fixture(scope="module")
def two_node_cluster():
    # Short and private: Ray puts socket files under it (Unix socket paths are limited to ~107 bytes).
    state_dir = Path(tempfile.mkdtemp(prefix="rqa-", dir="/tmp"))
    cluster = LocalCluster(state_dir)
    try:
        started = cluster.script("start", timeout=240)
        if started.returncode != 0:
            pytest.fail(f"cluster/local-cluster.sh start failed:\n{started.stdout[-3000:]}\n{started.stderr[-5000:]}")
        yield cluster
    finally:
        try:
            cluster.script("stop", timeout=120)
        except subprocess.TimeoutExpired:
            pass
        cluster.kill_recorded_groups()
        shutil.rmtree(state_dir, ignore_errors=True)


def submit(cluster: LocalCluster, submission_id: str, entrypoint: list[str], timeout: float) -> None:
    """``ray job submit`` the checkout as the working dir, wait, and check that the job succeeded."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1"}, "excludes": [".git"]}
    command = [ray_cli, "job", "submit", "--address", cluster.dashboard, "--submission-id", submission_id,
               "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]
    try:
        submitted = subprocess.run(command, cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        subprocess.run([ray_cli, "job", "stop", "--address", cluster.dashboard, submission_id],
                       env=cluster.env, capture_output=True, timeout=60)
        pytest.fail(f"the job did not finish in {error.timeout} s:\n{(error.stdout or b'')[-4000:]!r}")
    log = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, log[-6000:]
    assert f"Job '{submission_id}' succeeded" in log


def test_two_node_cluster_has_a_head_and_a_worker_node_with_their_own_cpus(two_node_cluster):
    nodes = two_node_cluster.state()["nodes"]
    alive = [n for n in nodes if n["state"] == "ALIVE"]
    assert len(alive) == 2
    assert sorted(n["is_head_node"] for n in alive) == [False, True]
    assert sorted(n["cpus"] for n in alive) == [HEAD_CPUS, WORKER_CPUS]
    # Ray's ports take no request without the cluster's token (the Jobs API would run any code).
    for auth in ({"RAY_AUTH_TOKEN": secrets.token_hex(32)}, {"RAY_AUTH_MODE": "disabled"}):
        refused = subprocess.run([sys.executable, "-c", STATE_QUERY, two_node_cluster.dashboard, ""],
                                 env={**two_node_cluster.env, **auth}, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0, auth


def test_ray_job_submit_trains_on_workers_spread_over_both_nodes(two_node_cluster):
    cluster = two_node_cluster
    model_dir = build_tiny_model(cluster.state_dir / "tiny-bert")  # an absolute path every node can read
    output_dir = cluster.state_dir / "out"
    storage = cluster.state_dir / "storage"  # shared by definition on one machine; NFS or s3:// on a real cluster
    entrypoint = [
        "python", "-m", "train_job",
        "--model", str(model_dir),
        # Relative paths: read in the job's working dir, i.e. the uploaded copy of this checkout.
        "--train-file", "tests/fixtures/tiny-squad.jsonl", "--validation-file", "tests/fixtures/tiny-squad.json",
        "--output-dir", str(output_dir), "--storage-path", str(storage), "--run-name", "two-node",
        "--num-workers", "2", "--cpus-per-worker", str(CPUS_PER_TRAIN_WORKER),
        "--epochs", "1", "--learning-rate", "3e-3", "--warmup-ratio", "0", "--max-failures", "0",
        "--per-device-batch-size", "4", "--max-length", "48", "--stride", "16", "--max-question-length", "20",
    ]
    started = time.monotonic()
    submit(cluster, SUBMISSION_ID, entrypoint, timeout=420)
    print(f"job took {time.monotonic() - started:.0f} s")

    state = cluster.state(SUBMISSION_ID)
    assert state["job"]["status"].endswith("SUCCEEDED")
    assert state["job"]["runtime_env"]["working_dir"].startswith("gcs://"), "the checkout travelled as the working dir"
    head_id = next(n["node_id"] for n in state["nodes"] if n["is_head_node"])
    worker_id = next(n["node_id"] for n in state["nodes"] if not n["is_head_node"])

    # The outputs: exported model, metrics, checkpoints in the storage path.
    for name in ("metrics.json", "predictions.json", "model/config.json"):
        assert (output_dir / name).is_file(), name
    assert list((storage / "two-node").glob("checkpoint_*")), "no checkpoint in --storage-path"
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["num_workers"] == 2

    # Where the workers ran, as they report it: one node id per worker, in rank order.
    assert "worker_node_ids" in metrics, "train_job must record each worker's node id in metrics.json"
    reported = metrics["worker_node_ids"]
    assert len(reported) == 2
    assert set(reported) == {head_id, worker_id}

    # ...and as Ray recorded it: this job's RayTrainWorker actors ran on both nodes.
    job_workers = [a for a in state["train_workers"] if a["job_id"] == state["job"]["job_id"]]
    assert len(job_workers) == 2
    assert {a["node_id"] for a in job_workers} == {head_id, worker_id}


def test_ray_job_submit_answers_a_file_and_writes_predictions_and_metrics(two_node_cluster):
    """``train_job.predict`` as a submitted job: a pool of two model actors answers the fixture
    questions (read by the driver from the uploaded working dir); the driver writes predictions and
    metrics to an absolute path."""
    cluster = two_node_cluster
    model_dir = build_tiny_model(cluster.state_dir / "tiny-bert-predict")
    output_dir = cluster.state_dir / "predict-out"
    entrypoint = [
        "python", "-m", "train_job.predict", "--model", str(model_dir),
        "--data", "tests/fixtures/tiny-squad.json",  # a JSON document: read by the driver, in the working dir
        "--output", str(output_dir), "--concurrency", "2", "--batch-size", "4",
    ]
    submit(cluster, "rqa-two-node-predict", entrypoint, timeout=300)

    expected_ids = [json.loads(line)["id"] for line in (ROOT / "tests/fixtures/tiny-squad.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (output_dir / "predictions.jsonl").read_text().splitlines()]
    assert sorted(row["id"] for row in rows) == sorted(expected_ids)
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["total"] == len(expected_ids) and metrics["actors"] == 2
