"""Epoch loop: DDP, DistributedSampler.set_epoch, SGD with momentum, per-epoch StepLR.

Run with torchrun / `lattice run`; gloo on CPU. Unmodified: knows nothing about Lattice.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from _zoo import IdDataset, log_batch, save_params
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    data = IdDataset(int(os.environ.get("ZOO_SAMPLES", "48")))
    sampler = DistributedSampler(data, shuffle=True, seed=7)
    loader = DataLoader(data, batch_size=int(os.environ.get("ZOO_BATCH", "4")), sampler=sampler)
    for epoch in range(int(os.environ.get("ZOO_EPOCHS", "3"))):
        sampler.set_epoch(epoch)
        for ids, x, y in loader:
            log_batch(rank, epoch, ids)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    if rank == 0:
        save_params(model.module)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
