"""Plain DDP training on CPU (gloo), written for torchrun: no Lattice import anywhere.

Launch it with ``torchrun`` or ``lattice run`` unchanged. It prints one line per completed
optimizer step, which tests and benchmarks read:

    STEP step=12 rank=0 world=4 round=3 restart=1 pid=4242 t=1700000000.123456 loss=0.1234

``round`` is ``LATTICE_ROUND`` (``-`` under torchrun), ``restart`` is
``TORCHELASTIC_RESTART_COUNT``, ``t`` is the wall-clock time the step completed. With
``--checkpoint PATH`` it saves every ``--save-every`` steps and resumes from there, the way
torchrun's documentation suggests elastic scripts do.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=200, help="stop after this many steps")
    p.add_argument("--step-time", type=float, default=0.05, help="extra seconds per step")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--checkpoint", default=None, help="save/resume here (rank 0 writes)")
    p.add_argument("--save-every", type=int, default=10)
    return p.parse_args()


def line(kind: str, **fields: object) -> None:
    text = " ".join(f"{k}={v}" for k, v in fields.items())
    print(f"{kind} {text}", flush=True)


def main() -> None:
    args = parse()
    dist.init_process_group("gloo")  # env:// — MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
    rank, world = dist.get_rank(), dist.get_world_size()
    tags = {
        "rank": rank,
        "world": world,
        "round": os.environ.get("LATTICE_ROUND", "-"),
        "restart": os.environ.get("TORCHELASTIC_RESTART_COUNT", "-"),
        "pid": os.getpid(),
    }
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    start = 0
    if args.checkpoint and os.path.exists(args.checkpoint):
        state = torch.load(args.checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
    ddp = DistributedDataParallel(model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 8, generator=gen)
    y = x.sum(dim=1, keepdim=True)
    sampler = DistributedSampler(TensorDataset(x, y), num_replicas=world, rank=rank, seed=2)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch, sampler=sampler)
    line("START", **tags, step=start, t=f"{time.time():.6f}")
    step, epoch = start, 0
    while step < args.steps:
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            loss = nn.functional.mse_loss(ddp(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            line("STEP", step=step, **tags, t=f"{time.time():.6f}", loss=f"{loss.item():.4f}")
            if args.checkpoint and rank == 0 and step % args.save_every == 0:
                tmp = f"{args.checkpoint}.tmp"
                torch.save(
                    {"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, tmp
                )
                os.replace(tmp, args.checkpoint)
            if args.step_time:
                time.sleep(args.step_time)
            if step >= args.steps:
                break
        epoch += 1
    line("DONE", **tags, step=step, t=f"{time.time():.6f}")
    # Free DDP while its process group exists: freed after destroy_process_group (as main()
    # returns), its Reducer drops the group's last reference and joins gloo's threads holding
    # the GIL, which one of them may need: a hang at exit, seen 2 in 15 runs on a loaded machine
    # (pytorch#56297). With this line: 0 in 25.
    del ddp
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
