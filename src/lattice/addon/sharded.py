"""FSDP (``fully_shard``) models and their optimizers: checkpointed as full state dicts.

A sharded model's ``state_dict`` holds only this rank's shards, and they are laid out for this
world size. The addon instead takes the full state with `torch.distributed.checkpoint`'s
state-dict API (every rank takes part: it is a collective; the full tensors land on rank 0, on
the CPU) and, on restore, hands every rank the full state to shard again for the world it
has now: a job resized from 4 to 3 workers restores the same model. Only rank 0 has the file;
the other nodes receive it from rank 0 at restore (see ``Runtime._agree_local``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


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


def load(objects: dict[str, Any], saved: dict[str, Any]) -> set[str]:
    """Load the full states `full_states` took into the sharded objects; their names."""
    models = [obj for obj in objects.values() if is_sharded(obj)]
    if not models:
        return set()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    done: set[str] = set()
    for name, obj in objects.items():
        if name not in saved:
            continue
        if isinstance(obj, nn.Module) and is_sharded(obj):
            set_model_state_dict(obj, saved[name], options=options)
            done.add(name)
        elif isinstance(obj, torch.optim.Optimizer):
            owner = _owner(obj, models)
            if owner is not None:
                set_optimizer_state_dict(owner, obj, saved[name], options=options)
                done.add(name)
    return done
