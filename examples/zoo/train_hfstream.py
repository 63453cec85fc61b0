"""A Hugging Face ``datasets`` streaming dataset, split over the ranks (a pre-training shape).

JSON-lines shards in ``$ZOO_DATA`` are streamed (``load_dataset(..., streaming=True)``), split
by ``split_dataset_by_node``, batched by a ``DataLoader(num_workers=0)``; DDP over gloo when
WORLD_SIZE > 1, dropout, AdamW, an epoch loop calling ``set_epoch``. Nothing is downloaded.
Unmodified: knows nothing about Lattice.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from _zoo import log_batch, save_params
from datasets import load_dataset
from datasets.distributed import split_dataset_by_node
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader


def main() -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
    net = DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    shards = sorted(str(p) for p in Path(os.environ["ZOO_DATA"]).glob("*.jsonl"))
    stream = load_dataset("json", data_files=shards, split="train", streaming=True)
    stream = split_dataset_by_node(stream, rank=rank, world_size=world).with_format("torch")
    loader = DataLoader(stream, batch_size=2)
    torch.manual_seed(10 + rank)  # dropout differs per rank
    for epoch in range(int(os.environ.get("ZOO_EPOCHS", "2"))):
        stream.set_epoch(epoch)
        for batch in loader:
            log_batch(rank, epoch, batch["id"])
            loss = nn.functional.mse_loss(net(batch["x"]), batch["y"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    if rank == 0:
        save_params(model)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
