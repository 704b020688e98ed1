"""Run the QA service on a private local Ray for a test module, and poll it with deadlines."""

from __future__ import annotations

import socket
import time
from contextlib import contextmanager
from pathlib import Path

# Short windows so the fixture contexts span several overlapping windows (as `small_config`).
SMALL_QA = {"max_length": 48, "stride": 16, "max_question_length": 20}
# The API token the test services accept (they are given only its hash).
TOKEN = "test-token-not-a-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def token_hashes_file(directory: Path) -> Path:
    """A token hashes file in ``directory`` that accepts :data:`TOKEN`."""
    from serve_app.auth import hash_token

    path = directory / "api-token-hashes.txt"
    path.write_text(f"# the test token\n{hash_token(TOKEN)}\n", encoding="utf-8")
    return path


def service_config(model_dir: Path, port: int, **args) -> dict:
    """The packaged Serve config, made small: one model replica on half a CPU, the tiny model, a token."""
    from serve_app.app import load_serve_config

    config = load_serve_config()
    config["http_options"] = {"host": "127.0.0.1", "port": port, "request_timeout_s": 60}
    [app] = config["applications"]
    hashes = str(token_hashes_file(model_dir.parent))
    app["args"] = {**app["args"], "model": str(model_dir), **SMALL_QA, "token_hashes_file": hashes, **args}
    for deployment in app["deployments"]:
        deployment["ray_actor_options"] = {**deployment["ray_actor_options"], "num_cpus": 0.1}
        if deployment["name"] == "QAModel":
            deployment["ray_actor_options"]["num_cpus"] = 0.5
            deployment["autoscaling_config"] = {**deployment["autoscaling_config"], "max_replicas": 1}
    return config


@contextmanager
def local_serve(config: dict, *, metrics_export_port: int | None = None):
    """A fresh local Ray (never a cluster that happens to run here) serving ``config``; yields its URL.

    With ``metrics_export_port``, Ray exports its Prometheus metrics there every second.
    """
    import ray
    from ray import serve

    from serve_app.app import run_config

    metrics = {}
    if metrics_export_port:
        metrics = {"_metrics_export_port": metrics_export_port, "_system_config": {"metrics_report_interval_ms": 1000}}
    # Replica logs stay in Ray's session directory (/tmp/ray/session_latest/logs/serve) instead of
    # interleaving with pytest's output.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, **metrics)
    try:
        yield run_config(config).rstrip("/")
    finally:
        serve.shutdown()
        ray.shutdown()


def wait_until(condition, *, timeout_s: float, what: str, interval_s: float = 0.5):
    """Poll ``condition()`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def replica_counts(app_name: str, deployment: str) -> dict[str, int]:
    """``{state: count}`` of a deployment's replicas, e.g. ``{"RUNNING": 1}``; ``{}`` when it has none."""
    from ray import serve

    states = serve.status().applications[app_name].deployments[deployment].replica_states
    return {getattr(state, "value", state): count for state, count in states.items() if count}
