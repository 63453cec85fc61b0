"""The explicit API: a script that registers state of its own with ``lattice.register``.

An adaptive learning rate driven by an exponential average of the (all-reduced) loss, kept in
an object with ``state_dict``/``load_state_dict``: the one change this script makes for
Lattice is ``lattice.register(tracker)`` (a no-op without the addon). DDP over gloo, a
DistributedSampler with ``set_epoch``, SGD with momentum.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from _zoo import IdDataset, log_batch, save_params
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import lattice


class LossTracker:
    """An average of the loss, which sets the learning rate: state no optimizer holds."""

    def __init__(self) -> None:
        self.average, self.seen = 0.0, 0

    def update(self, loss: float) -> float:
        self.seen += 1
        self.average = loss if self.seen == 1 else 0.8 * self.average + 0.2 * loss
        return 0.05 / (1.0 + self.average)

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average, self.seen = float(state["average"]), int(state["seen"])


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracker = lattice.register(LossTracker())
    data = IdDataset(int(os.environ.get("ZOO_SAMPLES", "48")))
    sampler = DistributedSampler(data, shuffle=True, seed=7)
    loader = DataLoader(data, batch_size=4, sampler=sampler)
    for epoch in range(int(os.environ.get("ZOO_EPOCHS", "3"))):
        sampler.set_epoch(epoch)
        for ids, x, y in loader:
            log_batch(rank, epoch, ids)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            for group in opt.param_groups:
                group["lr"] = tracker.update(float(mean) / world)
    if rank == 0:
        save_params(model.module)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
