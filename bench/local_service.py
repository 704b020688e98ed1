"""Run the service on a private local Ray and watch it: tooling for the tests and benchmarks, not the service."""

from __future__ import annotations

import random
import socket
import time
from contextlib import contextmanager
from pathlib import Path

RAY_WORKER_PORTS_END = 20000  # Ray's workers listen on 10002-19999 unless told otherwise


def free_port() -> int:
    """A port free on every interface (one free on loopback only may be taken on the node's address,
    where Ray's own servers listen, and a service may bind all interfaces), drawn from between Ray's
    worker ports and the kernel's ephemeral range: a port that ``bind(0)`` hands out can be handed
    again to one of the Ray processes a service starts before the service binds it."""
    candidates = range(RAY_WORKER_PORTS_END, ephemeral_port_range()[0])
    for port in random.sample(candidates, k=min(64, len(candidates))):
        with socket.socket() as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as probe:  # no such range on this system
        probe.bind(("", 0))
        return probe.getsockname()[1]


def ephemeral_port_range() -> tuple[int, int]:
    """The ports the kernel hands out for ``bind(0)`` and outgoing connections (Linux's default where
    unreadable)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


@contextmanager
def local_serve(config: dict, *, num_cpus: int = 4, log_to_driver: bool = False,
                metrics_export_port: int | None = None):
    """A fresh local Ray (never a cluster that happens to run here) serving ``config``; yields its URL.

    Replica logs stay in Ray's session directory unless ``log_to_driver``. With
    ``metrics_export_port``, Ray exports its Prometheus metrics there every second.
    """
    import ray
    from ray import serve

    from serve_app.app import run_config
    from serve_app.request_ids import set_proxy_environment

    metrics = {}
    if metrics_export_port:
        metrics = {"_metrics_export_port": metrics_export_port, "_system_config": {"metrics_report_interval_ms": 1000}}
    set_proxy_environment()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
             logging_level="WARNING", **metrics)
    try:
        yield run_config(config).rstrip("/")
    finally:
        serve.shutdown()
        ray.shutdown()


def wait_until(condition, *, timeout_s: float, what: str, interval_s: float = 0.2):
    """Poll ``condition()`` until it returns something truthy; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def replica_counts(app_name: str, deployment: str) -> dict[str, int]:
    """``{state: count}`` of a deployment's replicas, e.g. ``{"RUNNING": 1}``; ``{}`` when it has none."""
    from ray import serve

    states = serve.status().applications[app_name].deployments[deployment].replica_states
    return {getattr(state, "value", state): count for state, count in states.items() if count}


@contextmanager
def serving(config: dict):
    """Run ``config``'s application on the connected Ray (``benchlib.local_ray``, say) and yield its URL; delete the
    application afterwards, so that a Ray and Serve the caller shares (the test suite's) are left as found."""
    from ray import serve

    from serve_app.app import run_config

    url = run_config(config).rstrip("/")
    try:
        yield url
    finally:
        name = config["applications"][0]["name"]
        serve.delete(name)
        wait_until(lambda: name not in serve.status().applications, timeout_s=60, what=f"application {name} gone")


def serve_app_config(model_dir: str, port: int, *, max_batch_size: int, replica_cpus: float, gpu: bool = False,
                     min_replicas: int = 1, max_replicas: int = 1, autoscaling: dict | None = None,
                     batch_wait_timeout_s: float | None = None, forward_batch_size: int | None = None,
                     dtype: str | None = None, backend: str | None = None,
                     request_deadline_s: float | None = None, reader_threads: int | None = None,
                     library: Path | None = None) -> dict:
    """serve_app's packaged config with its own CLI flags applied (``python -m serve_app`` would do the same),
    on 127.0.0.1 only; ``autoscaling`` adds QAModel autoscaling keys the CLI has no flag for. The HTTP
    proxy's timeout is kept above the request deadline, so that the deadline is what a slow request meets."""
    from serve_app.__main__ import configure, parse_args
    from serve_app.app import MODEL_DEPLOYMENT, load_serve_config

    flags = ["--model", model_dir, "--host", "127.0.0.1", "--port", str(port), "--max-batch-size", str(max_batch_size),
             "--num-cpus", str(replica_cpus), "--num-gpus", "1" if gpu else "0",
             "--min-replicas", str(min_replicas), "--max-replicas", str(max_replicas)]
    if batch_wait_timeout_s is not None:
        flags += ["--batch-wait-timeout-s", str(batch_wait_timeout_s)]
    if dtype:
        flags += ["--dtype", dtype]
    if backend:
        flags += ["--backend", backend]
    if request_deadline_s:
        flags += ["--request-deadline-s", str(request_deadline_s)]
    if reader_threads:
        flags += ["--reader-threads", str(reader_threads)]
    if library:
        flags += ["--library", str(library)]
    config = configure(load_serve_config(), parse_args(flags))
    [app] = config["applications"]
    config["http_options"]["request_timeout_s"] = max(config["http_options"]["request_timeout_s"],
                                                      app["args"].get("request_deadline_s", 30) + 30)
    if forward_batch_size:
        app["args"]["forward_batch_size"] = forward_batch_size
    model = next(d for d in app["deployments"] if d["name"] == MODEL_DEPLOYMENT)
    # Batches fill only when the replica may hold that many requests (serve_app checks it too).
    model["max_ongoing_requests"] = max(model.get("max_ongoing_requests", 5), 2 * max_batch_size)
    model["autoscaling_config"].update(autoscaling or {})
    if model["autoscaling_config"].get("initial_replicas", 0) > max_replicas:
        model["autoscaling_config"]["initial_replicas"] = max_replicas
    return config


def question_payloads(path: Path, count: int) -> list[dict]:
    """``count`` request bodies ``{"question", "context"}`` from a SQuAD-format file, cycling through it."""
    from qa_common import read_squad

    records = read_squad(path, require_answers=False)
    return [{"question": records[i % len(records)]["question"], "context": records[i % len(records)]["context"]}
            for i in range(count)]


def windows_per_payload(payloads: list[dict], model_dir: str) -> list[int]:
    """How many windows each request makes with the model's tokenizer and QAConfig (as the server computes it)."""
    import numpy as np

    from qa_common import load_qa_config, load_tokenizer, prepare_eval_features

    features = prepare_eval_features([str(i) for i in range(len(payloads))], [p["question"] for p in payloads],
                                     [p["context"] for p in payloads], load_tokenizer(model_dir), load_qa_config(model_dir))
    return np.bincount(features["example_id"].astype(int), minlength=len(payloads)).tolist()
