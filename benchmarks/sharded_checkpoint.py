"""Sharded (FSDP2) checkpoints: the addon's per-rank pieces against torch.distributed.checkpoint.

``fully_shard`` MLP with Adam over ``--world`` ranks (gloo on CPU, real processes), in one
invocation:

- save: the addon's snapshot (copy of this rank's pieces: what training waits for) and its
  write to a node-local file, against ``torch.distributed.checkpoint.save`` of the same sharded
  state dicts (blocking), and against gathering the full state on rank 0 (what the addon did
  before: time, and the bytes rank 0 then holds);
- restore at the same world size: the addon's load (read own file, fill the DTensors) against
  ``dcp.load``;
- restore at ``--world - 1`` ranks (a resize): both re-cut the old pieces for the new world.

    .venv/bin/python benchmarks/sharded_checkpoint.py [--quick] [--world 2 --width 2048]

Prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def build(width: int, depth: int) -> tuple[Any, Any]:
    import torch
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
    mesh = init_device_mesh("cpu", (int(os.environ["WORLD_SIZE"]),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for _ in range(2):  # the optimizer's moments exist
        opt.zero_grad()
        model(torch.randn(8, width)).square().mean().backward()
        opt.step()
    return model, opt


def timed(fn: Any, dist: Any) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def nbytes(obj: Any) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(nbytes(v) for v in obj)
    return 0


def rank_main(rank: int, world: int, port: int, args: Any, out: str, phase: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from lattice.addon import local_tier, sharded

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    model, opt = build(args.width, args.depth)
    objects = {"model.0": model, "optimizer.0": opt}
    root = Path(out)
    ours, theirs = root / "lattice", root / "dcp"
    figures: dict[str, Any] = {}

    def sd() -> dict[str, Any]:
        return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}

    if phase == "save":
        stalls, writes, saves, gathers = [], [], [], []
        full: Any = None
        for _ in range(args.repeat):
            got: list[Any] = []
            stalls.append(timed(lambda got=got: got.append(sharded.local_states(objects)), dist))
            skeletons, pieces = got[0]

            def write(skeletons: Any = skeletons, pieces: Any = pieces) -> None:
                local_tier.save(ours / f"{sharded.shard_name(rank, world)}.pt", pieces)
                if rank == 0:
                    meta = {"names": sorted(skeletons), "world": world}
                    local_tier.save(ours / "state.pt", {**skeletons, sharded.KEY: meta})

            writes.append(timed(write, dist))
            saves.append(timed(lambda: dcp.save(sd(), checkpoint_id=str(theirs)), dist))
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)

            def gather(options: Any = options) -> None:
                nonlocal full
                full = {
                    "model": get_model_state_dict(model, options=options),
                    "optim": get_optimizer_state_dict(model, opt, options=options),
                }

            gathers.append(timed(gather, dist))
        figures = {
            "lattice_stall_s": statistics.median(stalls),
            "lattice_write_s": statistics.median(writes),
            "dcp_save_s": statistics.median(saves),
            "full_gather_s": statistics.median(gathers),
            "full_state_bytes_rank0": nbytes(full) if rank == 0 else None,
            "shard_bytes_this_rank": nbytes(pieces),
        }
        same_world = True
    else:
        same_world = False
    # Restore (at this world size: the same as the save, or one less).
    old_world = world if same_world else world + 1
    loads, dcp_loads = [], []
    for _ in range(args.repeat):

        def ours_load() -> None:
            saved = local_tier.load(ours / "state.pt")
            holders = {j: j % world for j in range(old_world)}
            held = {
                j: local_tier.load(ours / f"{sharded.shard_name(j, old_world)}.pt", mapped=True)
                for j, holder in holders.items()
                if holder == rank
            }
            sharded.load(objects, saved, held, holders, dist)

        def dcp_load() -> None:
            state = sd()
            dcp.load(state, checkpoint_id=str(theirs))
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, opt, state["optim"])

        loads.append(timed(ours_load, dist))
        dcp_loads.append(timed(dcp_load, dist))
    key = "" if same_world else "reshard_"
    figures[f"lattice_{key}restore_s"] = statistics.median(loads)
    figures[f"dcp_{key}load_s"] = statistics.median(dcp_loads)
    if rank == 0:
        figures["params"] = sum(p.numel() for p in model.parameters())
        (root / f"{phase}.json").write_text(json.dumps(figures))
    dist.destroy_process_group()


def run_phase(world: int, args: Any, out: str, phase: str) -> dict[str, Any]:
    import torch.multiprocessing as mp

    from lattice.agent.ports import free_port

    mp.spawn(rank_main, args=(world, free_port(), args, out, phase), nprocs=world, join=True)
    return json.loads((Path(out) / f"{phase}.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a small model, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.width, args.depth, args.repeat = 256, 4, 1
    if args.world < 2:
        parser.error("--world must be at least 2 (the resize restores at --world - 1)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="lattice-sharded-bench-") as out:
        saved = run_phase(args.world, args, out, "save")
        resized = run_phase(args.world - 1, args, out, "reshard")
    result = {
        "benchmark": "sharded_checkpoint",
        "world": args.world,
        "params": saved.pop("params"),
        **saved,
        **{k: v for k, v in resized.items() if k != "params"},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
