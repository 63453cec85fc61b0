"""Epoch loop: DDP, DistributedSampler.set_epoch, SGD with momentum, per-epoch StepLR.

``ZOO_SAMPLER=bucket``: a batch sampler of the script's own instead (batches of similar
"length", shuffled by epoch, split over the ranks), as length-bucketing scripts have.
``ZOO_EVAL_FIRST=1``: rank 0 alone evaluates on a DataLoader of its own before training
(``ZOO_EVAL_FIRST=grad``: in eval mode, gradients left on);
``ZOO_LOADER_PER_EPOCH=1``: a new DataLoader every epoch (and a validation one after it);
``ZOO_ZIP=1``: a second, shorter task's loader zipped with the first (multi-task training);
``ZOO_ZERO=1``: ``ZeroRedundancyOptimizer`` (each rank holds its shard of the optimizer state).

Run with torchrun / `lattice run`; gloo on CPU. Unmodified: knows nothing about Lattice.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from _zoo import IdDataset, log_batch, save_params
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of ids with the same ``id % 3`` (a stand-in for length), in an order drawn from
    the seed and the epoch; rank r takes every world-th batch."""

    def __init__(self, n: int, batch: int, seed: int) -> None:
        self.n, self.batch, self.seed, self.epoch = n, batch, seed, 0
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = sorted(torch.randperm(self.n, generator=g).tolist(), key=lambda i: i % 3)
        batches = [order[i : i + self.batch] for i in range(0, self.n, self.batch)]
        batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        return batches[self.rank :: self.world]

    def __iter__(self) -> Iterator[list[int]]:  # a generator, like most samplers
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)))
    if os.environ.get("ZOO_ZERO") == "1":
        # Imported only here: it pulls in torch.distributed's rpc and FSDP modules, and with
        # them at module level the other cases' plain runs (no Lattice) hung now and then.
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(
            model.parameters(), optimizer_class=torch.optim.SGD, lr=0.05, momentum=0.9
        )
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    data = IdDataset(int(os.environ.get("ZOO_SAMPLES", "48")))
    batch = int(os.environ.get("ZOO_BATCH", "4"))
    if os.environ.get("ZOO_SAMPLER") == "bucket":
        sampler = BucketBatchSampler(len(data), batch, seed=7)
        loader = DataLoader(data, batch_sampler=sampler)
    else:
        sampler = DistributedSampler(data, shuffle=True, seed=7)
        loader = DataLoader(data, batch_size=batch, sampler=sampler)
    per_epoch = os.environ.get("ZOO_LOADER_PER_EPOCH") == "1"
    aux = None
    if os.environ.get("ZOO_ZIP") == "1":  # shorter: the zip ends with it, mid-pass of `loader`
        other = IdDataset(32, features=8)
        aux_sampler = DistributedSampler(other, shuffle=True, seed=11)
        aux = DataLoader(other, batch_size=batch, sampler=aux_sampler)
    if os.environ.get("ZOO_EVAL_FIRST") == "1" and rank == 0:
        with torch.no_grad():
            for _, vx, vy in DataLoader(IdDataset(8), batch_size=4):
                nn.functional.mse_loss(model.module(vx), vy)
    if os.environ.get("ZOO_EVAL_FIRST") == "grad" and rank == 0:  # no no_grad: eval mode only
        model.eval()
        for _, vx, vy in DataLoader(IdDataset(8), batch_size=4):
            nn.functional.mse_loss(model.module(vx), vy).item()
        model.train()
    for epoch in range(int(os.environ.get("ZOO_EPOCHS", "3"))):
        sampler.set_epoch(epoch)
        if aux is not None:
            aux_sampler.set_epoch(epoch)
        if per_epoch:
            loader = DataLoader(data, batch_size=batch, sampler=sampler)
        pairs = zip(loader, aux, strict=False) if aux is not None else None
        for item in pairs if pairs is not None else loader:
            (ids, x, y), extra = item if pairs is not None else (item, None)
            log_batch(rank, epoch, ids)
            loss = nn.functional.mse_loss(model(x), y)
            if extra is not None:
                loss = loss + 0.5 * nn.functional.mse_loss(model(extra[1]), -extra[2])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if per_epoch:
            seen = 0
            with torch.no_grad():
                for _, vx, vy in DataLoader(IdDataset(8), batch_size=4):
                    seen += len(vx)
                    nn.functional.mse_loss(model.module(vx), vy)
            assert seen == 8, "the validation loader saw no batch"
        sched.step()
    if rank == 0:
        save_params(model.module)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
