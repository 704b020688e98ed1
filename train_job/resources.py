"""Does the run fit the cluster? Checked before fitting, so a run that can never start fails in seconds.

Ray Train v2 does not fail a worker group whose placement group cannot be satisfied: it logs
"worker group startup timed out" and retries forever. So before ``fit()`` the driver compares what
the run asks for with what the cluster has (or can grow to), and says what would fit.

The capacity is ``ray.cluster_resources()`` (the nodes alive now). When the cluster has an
autoscaler, Ray keeps its configuration (node types and their ``max_workers``) in the GCS; Ray Train
and Ray Data read the largest size the cluster can reach from there
(``ray._private.state.state.get_max_resources_from_cluster_config()``), and so do we: the larger
of the two is the capacity. Without an autoscaler that call returns None.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from train_job.config import TrainConfig, TrainJobError

# CPUs each Tune trial's driver function reserves (tune.with_resources); its Train workers hold the rest.
TRIAL_DRIVER_CPUS = 0.1
# --cpus-per-worker auto (the quickstart preset): at most this many CPUs per worker.
AUTO_MAX_CPUS_PER_WORKER = 2.0


class ResourceError(TrainJobError):
    """The run asks for more than the cluster has or can scale to."""


@dataclass(frozen=True)
class Capacity:
    cpus: float  # the whole cluster's
    gpus: float
    largest_node_cpus: float  # one worker's bundle must fit on one node
    autoscaling: bool = False

    def describe(self) -> str:
        return "this cluster can scale to" if self.autoscaling else "this cluster has"


def cluster_capacity() -> Capacity:
    """The connected cluster's capacity: the nodes alive now, or the autoscaler's maximum when larger."""
    import ray

    now = ray.cluster_resources()
    node_cpus = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")]
    cpus, gpus, largest = now.get("CPU", 0.0), now.get("GPU", 0.0), max(node_cpus, default=0.0)
    maximum = _autoscaler_max_resources()
    if maximum:
        largest = max([largest, *_autoscaler_node_type_cpus()])
        return Capacity(max(cpus, maximum.get("CPU", 0)), max(gpus, maximum.get("GPU", 0)), largest, autoscaling=True)
    return Capacity(cpus, gpus, largest)


def one_machine() -> bool:
    """Whether the connected cluster is one node that cannot grow (a laptop, a workstation)."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive")) == 1 and not _autoscaler_max_resources()


def _autoscaler_max_resources() -> dict | None:
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:  # a private API: without it, plan with the nodes alive now
        return None


def _autoscaler_node_type_cpus() -> list[float]:
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
        return [group.resources.get("CPU", 0) for group in config.node_group_configs] if config else []
    except Exception:
        return []


def resolve_cpus_per_worker(config: TrainConfig, capacity: Capacity, *, driver_cpus: float = 0.0) -> TrainConfig:
    """``config`` with ``cpus_per_worker`` set: "auto" (None) shares the cluster's CPUs, less the
    trial driver's, among the workers, at most :data:`AUTO_MAX_CPUS_PER_WORKER` each."""
    if config.cpus_per_worker is not None:
        return config
    share = min(AUTO_MAX_CPUS_PER_WORKER, (capacity.cpus - driver_cpus) / config.num_workers,
                capacity.largest_node_cpus - driver_cpus)
    return dataclasses.replace(config, cpus_per_worker=max(_round_down(share), 0.1))


def check_fits(config: TrainConfig, capacity: Capacity, *, driver_cpus: float = 0.0) -> None:
    """Raise ResourceError saying what fits when the run (or one trial: ``driver_cpus`` > 0) cannot start."""
    what = "each trial needs" if driver_cpus else "the run needs"
    workers, per_worker = config.num_workers, config.cpus_per_worker
    needed = workers * per_worker + driver_cpus
    breakdown = f"{workers} worker(s) x {per_worker:g} CPUs" + (f" + {driver_cpus:g} for the trial driver" if driver_cpus else "")
    if config.use_gpu and workers > capacity.gpus:
        raise ResourceError(
            f"{what} {workers} GPU(s) (one per worker); {capacity.describe()} {capacity.gpus:g}: "
            f"use --num-workers {int(capacity.gpus)}" if capacity.gpus >= 1 else
            f"{what} {workers} GPU(s); {capacity.describe()} none: drop --use-gpu or connect to a GPU cluster")
    if round(needed, 4) > round(capacity.cpus, 4) or round(per_worker + driver_cpus, 4) > round(capacity.largest_node_cpus, 4):
        fitting = _round_down(min((capacity.cpus - driver_cpus) / workers, capacity.largest_node_cpus - driver_cpus))
        if fitting >= 0.1:
            hint = f"use --cpus-per-worker {fitting:g}"
        else:
            hint = f"use --num-workers {max(1, math.floor((capacity.cpus - driver_cpus) / per_worker))}"
        largest = (f", at most {capacity.largest_node_cpus:g} on one node"
                   if capacity.largest_node_cpus < capacity.cpus else "")
        raise ResourceError(
            f"{what} {needed:g} CPUs ({breakdown}); {capacity.describe()} {capacity.cpus:g}{largest}: {hint}"
        )


def _round_down(cpus: float) -> float:
    """Down to a tenth of a CPU (guarding against 1.9000000001 style float error)."""
    return math.floor(round(cpus * 10, 6)) / 10
