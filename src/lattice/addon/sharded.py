"""FSDP (``fully_shard``) models and their optimizers: checkpointed shard by shard.

A sharded model's state dict (``torch.distributed.checkpoint.state_dict``, not full) holds
DTensors: each rank has its piece of every tensor. Each rank saves only its pieces, as plain
tensors with their place in the whole tensor (offset), in its own file; the rest of the state
dict (step counters, buffers, hyper-parameters: the same on every rank) is its *skeleton*,
saved once with the replicated state. Nothing is gathered: no rank ever holds the whole model,
and a snapshot costs each rank a copy of its own shard.

On restore the new world may differ (a resize): every rank builds its new pieces from the old
ones, reading the rows its new piece shares with each old piece. An old rank's file is read by
one rank that has it (its *holder*: on a restart at the same size, the rank itself, and then
nothing crosses the network); pieces a rank needs from another holder's file are broadcast
from that holder one tensor at a time, so no rank holds more than its own shard and one piece
in flight.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

KEY = "sharded"  # in a state file: {"names": [...], "world": N} of the sharded objects
PIECE = "lattice.piece"  # a skeleton's placeholder for a DTensor: {PIECE: index, "shape": [...]}

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offset, shape) of a piece in its whole tensor


def is_sharded(obj: Any) -> bool:
    """A module with DTensor parameters (``fully_shard``, tensor parallel)."""
    if not isinstance(obj, nn.Module):
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in obj.parameters())


def shard_name(rank: int, world: int) -> str:
    """The file (and service shard) that holds rank ``rank``'s pieces of a ``world``-rank job."""
    return f"shard-{rank}-of-{world}"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    """(rank, world) of a `shard_name`, else None."""
    parts = name.split("-")
    if len(parts) != 4 or parts[0] != "shard" or parts[2] != "of":
        return None
    if parts[1].isdigit() and parts[3].isdigit() and int(parts[1]) < int(parts[3]):
        return int(parts[1]), int(parts[3])
    return None


def _owner(opt: torch.optim.Optimizer, models: list[nn.Module]) -> nn.Module | None:
    params = {id(p) for group in opt.param_groups for p in group["params"]}
    return next((m for m in models if any(id(p) in params for p in m.parameters())), None)


def _sharded_dicts(objects: dict[str, Any], names: list[str] | None = None) -> dict[str, Any]:
    """This rank's (sharded) state dict of every sharded model and of its optimizers: live
    DTensors, not copies. With ``names``, only those (and an optimizer's state is created
    first, so a restore has every tensor to fill)."""
    from torch.distributed.checkpoint.state_dict import (
        _init_optim_state,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    models = [obj for obj in objects.values() if is_sharded(obj)]
    found: dict[str, Any] = {}
    for name, obj in objects.items():
        if names is not None and name not in names:
            continue
        if isinstance(obj, nn.Module) and is_sharded(obj):
            found[name] = get_model_state_dict(obj)
        elif isinstance(obj, torch.optim.Optimizer):
            owner = _owner(obj, models)
            if owner is not None:
                if names is not None:
                    _init_optim_state(obj)  # steps once with lr 0: the caller ignores it
                found[name] = get_optimizer_state_dict(owner, obj)
    return found


def _walk(obj: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """(path, leaf) of a nested state dict, in a fixed order (dicts by insertion)."""
    if isinstance(obj, dict) and PIECE not in obj:
        for key, value in obj.items():
            yield from _walk(value, (*path, key))
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from _walk(value, (*path, i))
    else:
        yield path, obj


def _rebuild(obj: Any, leaf: Any, path: tuple[Any, ...] = ()) -> Any:
    """``obj`` with every leaf (a placeholder is one) replaced by ``leaf(path, value)``."""
    if isinstance(obj, dict) and PIECE not in obj:
        return {k: _rebuild(v, leaf, (*path, k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rebuild(v, leaf, (*path, i)) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(_rebuild(v, leaf, (*path, i)) for i, v in enumerate(obj))
    return leaf(path, obj)


def _box(tensor: Any) -> Box:
    """Where this rank's piece of a DTensor lies in the whole tensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        tensor.shape, tensor.device_mesh, tensor.placements
    )
    return tuple(int(v) for v in offset), tuple(int(v) for v in shape)


def local_states(
    objects: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]] | None:
    """(skeletons, pieces) of the sharded objects, or None when no model is sharded.

    Skeletons are the same on every rank (they go into the replicated state); pieces are this
    rank's, each ``{"local": tensor, "offset": [...]}``. Both are copies, safe to write later.
    """
    from torch.distributed.tensor import DTensor

    from lattice.addon.state import detached_copy

    if not any(is_sharded(obj) for obj in objects.values()):
        return None
    skeletons: dict[str, Any] = {}
    pieces: dict[str, list[dict[str, Any]]] = {}
    for name, sd in _sharded_dicts(objects).items():
        mine: list[dict[str, Any]] = []

        def leaf(_path: Any, value: Any, mine: list[dict[str, Any]] = mine) -> Any:
            if not isinstance(value, DTensor):
                return detached_copy(value)
            offset, _shape = _box(value)
            mine.append({"local": detached_copy(value.to_local()), "offset": list(offset)})
            return {PIECE: len(mine) - 1, "shape": list(value.shape)}

        skeletons[name] = _rebuild(sd, leaf)
        pieces[name] = mine
    return skeletons, pieces


def _overlap(a: Box, b: Box) -> tuple[list[slice], list[slice]] | None:
    """The slices of ``a``'s and of ``b``'s tensors where the two boxes overlap, or None."""
    in_a, in_b = [], []
    for oa, sa, ob, sb in zip(a[0], a[1], b[0], b[1], strict=True):
        lo, hi = max(oa, ob), min(oa + sa, ob + sb)
        if lo >= hi:
            return None
        in_a.append(slice(lo - oa, hi - oa))
        in_b.append(slice(lo - ob, hi - ob))
    return in_a, in_b


def load(
    objects: dict[str, Any],
    saved: dict[str, Any],
    held: dict[int, dict[str, list[dict[str, Any]]]],
    holders: dict[int, int],
    dist: Any,
) -> set[str]:
    """Load the sharded objects' state from the skeletons in ``saved`` and the old ranks'
    pieces; their names. A collective: every rank calls it with the same ``saved``.

    ``held`` is the pieces of the old ranks this rank holds (read from its node or the
    service); ``holders`` maps every old rank to the rank that holds its pieces.
    """
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    meta = saved.get(KEY) or {}
    names = [name for name in meta.get("names", []) if name in objects]
    if not names:
        return set()
    templates = _sharded_dicts(objects, names)
    current = {name: dict(_walk(templates[name])) for name in names}
    # This rank's new boxes and the old boxes it holds, from every rank: who needs what.
    wanted: dict[tuple[str, int], Box] = {}
    for name in names:
        for path, value in _walk(saved[name]):
            if isinstance(value, dict) and PIECE in value:
                now = current[name].get(path)
                if now is None or list(now.shape) != list(value["shape"]):
                    raise RuntimeError(
                        f"{name}: the checkpoint's {'.'.join(map(str, path))} of shape "
                        f"{value['shape']} does not fit the model's "
                        f"{None if now is None else list(now.shape)}"
                    )
                wanted[(name, value[PIECE])] = _box(now)
    have = {
        (name, i, old): (tuple(p["offset"]), tuple(p["local"].shape))
        for old, files in held.items()
        for name in names
        for i, p in enumerate(files.get(name, []))
    }
    everyone: list[Any] = [(wanted, have)]
    if dist is not None and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (wanted, have))
    plan = _Plan(everyone, held, holders, dist)
    loaded: set[str] = set()
    for name in names:

        def leaf(path: tuple[Any, ...], value: Any, name: str = name) -> Any:
            if isinstance(value, dict) and PIECE in value:
                return plan.piece(name, value[PIECE], current[name][path])
            return value

        restored = _rebuild(saved[name], leaf)
        obj = objects[name]
        if isinstance(obj, torch.optim.Optimizer):
            owner = _owner(obj, [m for m in objects.values() if is_sharded(m)])
            assert owner is not None, f"{name}: the sharded model it steps is gone"
            set_optimizer_state_dict(owner, obj, restored)
        else:
            set_model_state_dict(obj, restored)
        loaded.add(name)
    return loaded


def _size(shape: tuple[int, ...] | list[int]) -> int:
    return math.prod(int(v) for v in shape)


class _Plan:
    """Moves the old pieces to the ranks whose new pieces overlap them (see `load`)."""

    def __init__(
        self,
        everyone: list[Any],
        held: dict[int, dict[str, list[dict[str, Any]]]],
        holders: dict[int, int],
        dist: Any,
    ) -> None:
        self.everyone, self.held, self.holders, self.dist = everyone, held, holders, dist
        self.rank = dist.get_rank() if dist is not None else 0
        self.old: dict[tuple[str, int, int], Box] = {}
        for _wanted, have in everyone:
            self.old.update(have)
        self.device = torch.device("cpu")
        if dist is not None and str(dist.get_backend()) == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

    def piece(self, name: str, i: int, like: Any) -> Any:
        """``like`` (the model's or optimizer's own DTensor at placeholder ``i``'s place) with
        its local piece filled from the old pieces that overlap it.

        Filled in place: the ``set_*_state_dict`` after this copies nothing more, and the old
        pieces (mapped from their files) are only read, never adopted as live tensors.
        """
        mine = self.everyone[self.rank][0][(name, i)]
        target = like.to_local()
        covered = 0
        for old in sorted(self.holders):
            box = self.old.get((name, i, old))
            if box is None:
                raise RuntimeError(f"{name}: piece {i} of old rank {old} is missing")
            needing = [
                r
                for r, (wanted, _have) in enumerate(self.everyone)
                if _size(box[1]) and _overlap(wanted[(name, i)], box)
            ]
            if not needing:
                continue
            holder = self.holders[old]
            got = self.held[old][name][i]["local"] if self.rank == holder else None
            if needing != [holder]:  # another rank needs it: the holder broadcasts it
                buffer = (
                    got.to(self.device, like.dtype).contiguous()
                    if got is not None
                    else torch.empty(box[1], dtype=like.dtype, device=self.device)
                )
                self.dist.broadcast(buffer, src=holder)
                got = buffer
            if self.rank not in needing:
                continue
            assert got is not None
            where = _overlap(mine, box)
            assert where is not None
            ours, theirs = where
            with torch.no_grad():
                target[tuple(ours)] = got[tuple(theirs)].to(target.device, like.dtype)
            covered += _size([s.stop - s.start for s in ours])
        if covered != _size(mine[1]):
            raise RuntimeError(f"{name}: the old pieces do not cover this rank's piece {i}")
        return like
