"""The two collectives the training workers use; on one worker they return at once."""

from __future__ import annotations

import ray.train.torch
import torch
import torch.distributed as dist


def gather_objects(value, world_size: int) -> list:
    """``value`` of every worker, in rank order."""
    if world_size == 1:
        return [value]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device_values = values.to(ray.train.torch.get_device()) if dist.get_backend() == "nccl" else values.cpu()
        dist.all_reduce(device_values)
        return device_values.cpu()
    return values.cpu()
