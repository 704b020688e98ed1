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
