"""FSDP: ``fully_shard`` over a CPU device mesh (gloo), Adam, DistributedSampler.set_epoch.

Run with torchrun / `lattice run`. Unmodified: knows nothing about Lattice. The parameters are
sharded over the ranks; the final full parameters are gathered to rank 0 to be saved.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from _zoo import IdDataset, log_batch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> None:
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    samples = IdDataset(int(os.environ.get("ZOO_SAMPLES", "48")))
    sampler = DistributedSampler(samples, shuffle=True, seed=7)
    batches = DataLoader(samples, batch_size=int(os.environ.get("ZOO_BATCH", "4")), sampler=sampler)
    epochs = int(os.environ.get("ZOO_EPOCHS", "3"))
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for ids, x, y in batches:
            log_batch(rank, epoch, ids)
            train_step(model, opt, x, y)
    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    out = os.environ.get("ZOO_OUT")
    if rank == 0 and out:
        torch.save(full, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
