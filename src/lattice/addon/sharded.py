"""FSDP (``fully_shard``) models and their optimizers: checkpointed as full state dicts.

A sharded model's ``state_dict`` holds only this rank's shards, and they are laid out for this
world size. The addon instead takes the full state with `torch.distributed.checkpoint`'s
state-dict API (every rank takes part: it is a collective; the full tensors land on rank 0, on
the CPU) and, on restore, hands every rank the full state to shard again for the world it
has now: a job resized from 4 to 3 workers restores the same model. Only rank 0 has the file;
the other nodes receive it from rank 0 at restore (see ``Runtime._agree_local``). At restore
only rank 0 keeps the full state in memory and broadcasts it tensor by tensor, so a node with
eight ranks does not hold eight copies of the model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

KEY = "sharded"  # in a state file: the names whose entries are full states of sharded objects


def is_sharded(obj: Any) -> bool:
    """A module with DTensor parameters (``fully_shard``, tensor parallel)."""
    if not isinstance(obj, nn.Module):
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in obj.parameters())


def _owner(opt: torch.optim.Optimizer, models: list[nn.Module]) -> nn.Module | None:
    params = {id(p) for group in opt.param_groups for p in group["params"]}
    return next((m for m in models if any(id(p) in params for p in m.parameters())), None)


def full_states(objects: dict[str, Any]) -> dict[str, Any] | None:
    """The full state of every sharded model and of its optimizers (on rank 0; empty on the
    others), or None when no model is sharded. Every rank must call it at the same step."""
    models = [obj for obj in objects.values() if is_sharded(obj)]
    if not models:
        return None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    found: dict[str, Any] = {}
    for name, obj in objects.items():
        if isinstance(obj, nn.Module) and is_sharded(obj):
            found[name] = get_model_state_dict(obj, options=options)
        elif isinstance(obj, torch.optim.Optimizer):
            owner = _owner(obj, models)
            if owner is not None:
                found[name] = get_optimizer_state_dict(owner, obj, options=options)
    return found


def without_full(saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` less the full states `full_states` took (they are needed on rank 0 only:
    `load` broadcasts them from there), so a node's other ranks do not each copy them."""
    for name in saved.get(KEY, []):
        saved.pop(name, None)
    return saved


def load(objects: dict[str, Any], saved: dict[str, Any], rank: int) -> set[str]:
    """Load the full states `full_states` took into the sharded objects; their names.

    Rank 0 reads them from ``saved`` and broadcasts each tensor; every rank keeps its shard of
    it for the world it has now (``broadcast_from_rank0``). A collective: the names come from
    the file, which is the same on every rank, so every rank makes the same calls.
    """
    names = [name for name in saved.get(KEY, []) if name in objects]
    if not names:
        return set()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    models = [obj for obj in objects.values() if is_sharded(obj)]
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    for name in names:
        obj, full = objects[name], saved[name] if rank == 0 else {}
        if isinstance(obj, torch.optim.Optimizer):
            owner = _owner(obj, models)
            assert owner is not None, f"{name}: the sharded model it steps is gone"
            set_optimizer_state_dict(owner, obj, full, options=options)
        else:
            set_model_state_dict(obj, full, options=options)
    return set(names)
