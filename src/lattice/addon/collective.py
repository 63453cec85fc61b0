"""The process group as the addon uses it: none outside a group, agreement across ranks."""

from __future__ import annotations

import os
from typing import Any

import torch


def dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> int:
    """The group's size; before the group exists, the one the launcher gave."""
    group = dist()
    return group.get_world_size() if group else int(os.environ.get("WORLD_SIZE", "1"))


def all_max(dist: Any, value: int) -> int:
    """The largest ``value`` over all ranks, on a device the group's backend can reduce.

    A plain ``nccl`` group reduces CUDA tensors only; gloo (and ``cpu:gloo,cuda:nccl``) CPU ones.
    """
    device = torch.device("cpu")
    if str(dist.get_backend()) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def everyone(dist: Any, value: Any) -> list[Any]:
    """``value`` of every rank, by rank (``all_gather_object``); ``[value]`` alone."""
    if dist is None or dist.get_world_size() <= 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
