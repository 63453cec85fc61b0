"""Sharded (FSDP2) state: each rank's pieces, and pieces of another world size loaded back."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lattice.addon import sharded


@pytest.fixture
def group(tmp_path: Any) -> Iterator[Any]:
    """A one-rank gloo group (a real one: FSDP2 needs it), gone after the test."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def fsdp_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    mesh = init_device_mesh("cpu", (1,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=0.1)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for i in range(steps):
        opt.zero_grad()
        model(torch.full((4, 5), float(i))).sum().backward()
        opt.step()


def split(pieces: list[dict[str, Any]], world: int) -> list[list[dict[str, Any]]]:
    """A one-rank job's pieces as a ``world``-rank job would have saved them (dim-0 chunks,
    as FSDP2 lays them out, the last ranks' possibly empty)."""
    out: list[list[dict[str, Any]]] = [[] for _ in range(world)]
    for piece in pieces:
        whole = piece["local"]
        size = -(-whole.shape[0] // world)
        for r in range(world):
            rows = whole[r * size : (r + 1) * size]
            out[r].append(
                {"local": rows.clone(), "offset": [min(r * size, whole.shape[0]), 0][: whole.dim()]}
            )
    return out


def test_shard_names_say_rank_and_world() -> None:
    assert sharded.shard_name(2, 3) == "shard-2-of-3"
    assert sharded.parse_shard_name("shard-2-of-3") == (2, 3)
    for bad in ("shard-3-of-3", "state", "shard-a-of-2", "shard-1-of"):
        assert sharded.parse_shard_name(bad) is None


def test_pieces_of_three_old_ranks_load_into_one(group: Any) -> None:
    """Pieces saved by a 3-rank job restore the same model and optimizer on one rank: every
    row lands where it was, the step counters come from the skeleton."""
    model, opt = fsdp_model()
    train(model, opt, 3)
    objects = {"model.0": model, "optimizer.0": opt}
    got = sharded.local_states(objects)
    assert got is not None
    skeletons, pieces = got
    assert set(skeletons) == {"model.0", "optimizer.0"}
    first = pieces["model.0"][0]
    assert first["offset"] == [0, 0] and first["local"].shape == (7, 5)  # one rank: all rows
    expected = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    old = {name: split(p, 3) for name, p in pieces.items()}
    held = {j: {name: old[name][j] for name in old} for j in range(3)}
    saved = {**skeletons, sharded.KEY: {"names": sorted(skeletons), "world": 3}}
    fresh, fresh_opt = fsdp_model()
    train(fresh, fresh_opt, 1)  # different values, so the load must change them
    loaded = sharded.load(
        {"model.0": fresh, "optimizer.0": fresh_opt}, saved, held, {0: 0, 1: 0, 2: 0}, group
    )
    assert loaded == {"model.0", "optimizer.0"}
    for key, value in fresh.state_dict().items():
        assert torch.equal(value.full_tensor(), expected[key]), key
    states = list(fresh_opt.state.values())
    assert all(int(s["step"]) == 3 for s in states)
    train(fresh, fresh_opt, 1)
    train(model, opt, 1)
    for key, value in fresh.state_dict().items():  # the optimizer's moments came back too
        assert torch.equal(value.full_tensor(), model.state_dict()[key].full_tensor()), key


def test_a_missing_old_piece_or_a_changed_model_is_refused(group: Any) -> None:
    model, opt = fsdp_model()
    train(model, opt, 1)
    got = sharded.local_states({"model.0": model})
    assert got is not None
    skeletons, pieces = got
    saved = {**skeletons, sharded.KEY: {"names": ["model.0"], "world": 2}}
    halves = split(pieces["model.0"], 2)
    with pytest.raises(RuntimeError, match="missing"):
        sharded.load({"model.0": model}, saved, {0: {"model.0": halves[0]}}, {0: 0, 1: 0}, group)
    other = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(other, mesh=init_device_mesh("cpu", (1,)))
    held = {j: {"model.0": halves[j]} for j in range(2)}
    with pytest.raises(RuntimeError, match="does not fit"):
        sharded.load({"model.0": other}, saved, held, {0: 0, 1: 0}, group)
