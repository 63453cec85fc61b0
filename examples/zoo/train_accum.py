"""Per-step scheduler, dropout and gradient accumulation (every 2 batches), Adam, DDP.

``ZOO_SCHED=warmup_cosine``: linear warm-up then cosine, chained by ``SequentialLR``.

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

ACCUMULATE = 2


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))
    model = DistributedDataParallel(net)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    if os.environ.get("ZOO_SCHED") == "warmup_cosine":  # a scheduler holding two others
        sched = torch.optim.lr_scheduler.SequentialLR(
            opt,
            [
                torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=4),
                torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20),
            ],
            milestones=[4],
        )
    else:
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.97)
    data = IdDataset(int(os.environ.get("ZOO_SAMPLES", "64")))
    sampler = DistributedSampler(data, shuffle=True, seed=3)
    loader = DataLoader(data, batch_size=4, sampler=sampler)
    for epoch in range(int(os.environ.get("ZOO_EPOCHS", "3"))):
        sampler.set_epoch(epoch)
        for i, (ids, x, y) in enumerate(loader):
            log_batch(rank, epoch, ids)
            loss = nn.functional.mse_loss(model(x), y) / ACCUMULATE
            loss.backward()
            if (i + 1) % ACCUMULATE == 0:
                opt.step()
                opt.zero_grad()
                sched.step()
    if rank == 0:
        save_params(model.module)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
