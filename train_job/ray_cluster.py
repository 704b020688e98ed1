"""Joining a Ray cluster (or starting one of its own, lightly), and sizing a pool of Ray Data actors to it: what every
job command shares."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass

ADDRESS_HELP = "Ray cluster address (default: RAY_ADDRESS, else a new local Ray)"
# Settings for the Ray processes a job starts for itself (a user's own values win): its log monitor
# lists the log folder every 0.5 s instead of before each read, ten times a second, and the event
# loops keep no per-handler timing statistics (they only feed Ray's debug dumps). Together about
# half a point of a 2-core machine's CPU (BENCHMARKS.md, "Ray's own processes during training").
LOCAL_RAY_ENV = {"RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0", "RAY_event_stats": "0"}


def add_address_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None, help=ADDRESS_HELP)


def connect_ray(address: str | None, **options) -> bool:
    """Join the cluster at ``address`` (else ``RAY_ADDRESS``, else start a local Ray with
    ``LOCAL_RAY_ENV``), unless connected; True if this started a Ray of its own."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    own = address in (None, "local")
    if own:
        for name, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(name, value)
    ray.init(address=address, **options)
    return own


def stop_ray_data_stats_actor() -> None:
    """Stop the detached actor that keeps Ray Data's pipeline statistics, after the job's last
    pipeline: it takes a few tenths of a point of a 2-core machine's CPU for as long as the cluster
    lives, and Ray Data starts it again when next used. For a Ray the job started itself only: on a
    shared cluster it serves other jobs too. (Ray Data's other helper, the autoscaling
    coordinator, serves Ray Train as well.)"""
    import ray
    from ray.data._internal.stats import STATS_ACTOR_NAME, STATS_ACTOR_NAMESPACE

    try:
        ray.kill(ray.get_actor(STATS_ACTOR_NAME, namespace=STATS_ACTOR_NAMESPACE))
    except ValueError:  # not started, or already gone
        pass


def add_actor_flags(parser: argparse.ArgumentParser, what: str, *, gpus: bool = False) -> None:
    """``--concurrency`` and ``--cpus-per-actor`` (and ``--num-gpus-per-actor``) of a pool of ``what``."""
    from train_job.cli import at_least

    parser.add_argument("--concurrency", type=at_least(1), default=None,
                        help=f"{what} (default: as many as the cluster holds; no more than the batches of work where the "
                             "command knows how many)")
    parser.add_argument("--cpus-per-actor", type=at_least(0.01, float), default=1, help="CPUs per actor (default: 1)")
    if gpus:
        parser.add_argument("--num-gpus-per-actor", type=at_least(0, float), default=0,
                            help="GPUs per actor (default: 0, CPU)")


@dataclass(frozen=True)
class ActorPool:
    actors: int
    per_actor: dict  # Ray resources of one actor: num_cpus, num_gpus

    @property
    def threads(self) -> int:
        """PyTorch threads for one actor: its whole CPUs."""
        return max(1, int(self.per_actor["num_cpus"]))

    @classmethod
    def fit(cls, args: argparse.Namespace, resources: dict | None = None, *, items: int | None = None) -> ActorPool:
        """The pool ``args`` asks for (``add_actor_flags``) on the connected cluster (or ``resources``);
        ValueError saying what fits when it cannot hold them. Without ``--concurrency``, no more actors
        than the batches of ``items`` (the work's size, when it is known; ``args.batch_size`` per batch):
        each actor loads a model before its first batch, so one beyond the batches would only start,
        load and wait (a rebuild of one changed document, say)."""
        import ray

        resources = ray.cluster_resources() if resources is None else resources
        cpus, gpus = args.cpus_per_actor, getattr(args, "num_gpus_per_actor", 0)
        limits = [resources.get("CPU", 0) / cpus] + ([resources.get("GPU", 0) / gpus] if gpus else [])
        fits = int(min(limits))
        batches = None if items is None else max(1, math.ceil(items / args.batch_size))
        actors = args.concurrency or (fits if batches is None else min(fits, batches))
        if actors < 1 or actors > fits:
            raise ValueError(
                f"the cluster ({resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs) holds {fits} "
                f"actor(s) of {cpus:g} CPU(s) and {gpus:g} GPU(s), not {actors}; lower --concurrency, "
                "--cpus-per-actor" + (" or --num-gpus-per-actor" if gpus else ""))
        return cls(actors, {"num_cpus": cpus, "num_gpus": gpus})
