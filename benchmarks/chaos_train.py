"""The training script of the chaos soak (`benchmarks/chaos.py`): plain torchrun-style DDP.

DDP over gloo, a `DistributedSampler` with `set_epoch`, a dataset whose items carry their sample
id, a small model and Adam. It has no checkpoint code: under `lattice run` the addon restores
model, optimizer and data position after every restart.

Per optimizer step each rank appends one JSON line to ``$CHAOS_LEDGER_DIR/rank<R>-pid<P>.jsonl``
(plain appends, flushed, so a kill -9 loses at most the step in flight)::

    {"e": epoch, "s": step, "r": rank, "w": world, "ids": [...], "pid": P,
     "round": LATTICE_ROUND, "port": MASTER_PORT, "t": unix time}

``s`` is the optimizer's own step count (Adam's ``state["step"]``), which the addon restores
with the optimizer: after a restore from step N the next line says N + 1.

Environment: ``CHAOS_SAMPLES`` (240), ``CHAOS_BATCH`` (4 per rank), ``CHAOS_EPOCHS`` (upper
bound, 10000), ``CHAOS_STEP_SLEEP`` (seconds per step, 0.1), ``CHAOS_BALLAST_KB`` (a buffer in
the model that makes checkpoints bigger, 0), ``CHAOS_STOP_FILE`` (when it exists, the ranks
agree to end after the current epoch).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


class IdDataset(Dataset):
    """Item ``i`` is ``(i, x_i, y_i)``, a deterministic function of ``i``."""

    def __init__(self, n: int, features: int = 8) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, features, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True).sin()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        return i, self.x[i], self.y[i]


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    ballast = int(os.environ.get("CHAOS_BALLAST_KB", "0")) * 256  # float32 values
    if ballast:
        net.register_buffer("ballast", torch.zeros(ballast))
    model = DistributedDataParallel(net, broadcast_buffers=False)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    data = IdDataset(int(os.environ.get("CHAOS_SAMPLES", "240")))
    sampler = DistributedSampler(data, shuffle=True, seed=7)
    loader = DataLoader(data, batch_size=int(os.environ.get("CHAOS_BATCH", "4")), sampler=sampler)
    pause = float(os.environ.get("CHAOS_STEP_SLEEP", "0.1"))
    stop_file = os.environ.get("CHAOS_STOP_FILE")
    ledger_dir = os.environ.get("CHAOS_LEDGER_DIR")
    ledger = None
    if ledger_dir:
        Path(ledger_dir).mkdir(parents=True, exist_ok=True)
        ledger = open(Path(ledger_dir) / f"rank{rank}-pid{os.getpid()}.jsonl", "a")  # noqa: SIM115
    first = next(iter(net.parameters()))
    tag = {
        "r": rank,
        "w": world,
        "pid": os.getpid(),
        "round": os.environ.get("LATTICE_ROUND", "-"),
        "port": os.environ.get("MASTER_PORT", "-"),
    }
    epoch = 0
    for epoch in range(int(os.environ.get("CHAOS_EPOCHS", "10000"))):
        sampler.set_epoch(epoch)
        batches = 0
        for ids, x, y in loader:
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            batches += 1
            step = int(opt.state[first]["step"])
            if ledger is not None:
                line = {"e": epoch, "s": step, **tag, "ids": ids.tolist(), "t": time.time()}
                ledger.write(json.dumps(line) + "\n")
                ledger.flush()
            if pause:
                time.sleep(pause)
        # End after an epoch that trained (not a fast-forwarded one) once the stop file exists;
        # every rank must agree, or the others would wait in the next collective forever.
        flags = torch.tensor([int(bool(stop_file) and Path(stop_file).exists()), batches])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if rank == 0 and batches:
            print(f"EPOCH {epoch} done at step {int(opt.state[first]['step'])}", flush=True)
        if flags[0] and flags[1]:
            break
    if rank == 0:
        print(f"DONE after epoch {epoch}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
