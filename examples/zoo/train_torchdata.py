"""torchdata's ``StatefulDataLoader`` (torchtitan's loader): it saves its own position.

One process: ``shuffle=True`` (torchdata's own RandomSampler, seeded once) with
``num_workers=ZOO_WORKERS`` (default 2, prefetching); two processes (DDP over gloo): a
``DistributedSampler`` with ``set_epoch``. Dropout, Adam, an epoch loop. Unmodified: knows
nothing about Lattice.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from _zoo import IdDataset, log_batch, save_params
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader


def main() -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
    net = DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    data = IdDataset(int(os.environ.get("ZOO_SAMPLES", "48")))
    sampler = DistributedSampler(data, shuffle=True, seed=3) if world > 1 else None
    workers = int(os.environ.get("ZOO_WORKERS", "2")) if world == 1 else 0
    loader = StatefulDataLoader(
        data, batch_size=4, shuffle=sampler is None, sampler=sampler, num_workers=workers
    )
    torch.manual_seed(10 + rank)  # dropout differs per rank
    for epoch in range(int(os.environ.get("ZOO_EPOCHS", "3"))):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for ids, x, y in loader:
            log_batch(rank, epoch, ids)
            loss = nn.functional.mse_loss(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    if rank == 0:
        save_params(model)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
