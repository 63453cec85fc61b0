"""An IterableDataset that streams samples and says where it stands (``state_dict`` /
``load_state_dict``, as Hugging Face ``datasets`` streaming and torchdata's ``Stateful`` do).

Each rank streams its share of an order shuffled per epoch (``set_epoch``), through a
``DataLoader(num_workers=0)``; DDP over gloo when WORLD_SIZE > 1, dropout, Adam, an epoch loop.
Unmodified: knows nothing about Lattice.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from _zoo import IdDataset, log_batch, save_params
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset


class Stream(IterableDataset):
    def __init__(self, n: int, rank: int, world: int) -> None:
        self.items = IdDataset(n)
        self.rank, self.world = rank, world
        self.epoch, self.offset, self.resume = 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.epoch)
        order = torch.randperm(len(self.items), generator=g)[self.rank :: self.world].tolist()
        start, self.resume = self.resume, 0
        for k in range(start, len(order)):
            self.offset = k + 1
            yield self.items[order[k]]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.resume = state["epoch"], state["offset"]


def main() -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
    net = DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    stream = Stream(int(os.environ.get("ZOO_SAMPLES", "48")), rank, world)
    loader = DataLoader(stream, batch_size=2)
    torch.manual_seed(10 + rank)  # dropout differs per rank
    for epoch in range(int(os.environ.get("ZOO_EPOCHS", "3"))):
        stream.set_epoch(epoch)
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
