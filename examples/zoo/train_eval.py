"""Train and evaluate every epoch: a second DataLoader (validation) with a metric averaged over
its batches, and a batch peeked with ``next(iter(loader))`` before training to size the model.
Unmodified: knows nothing about Lattice.
"""

from __future__ import annotations

import os

import torch
from _zoo import IdDataset, log_batch, save_params
from torch import nn
from torch.utils.data import DataLoader


def evaluate(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for _ids, x, y in loader:
            total += nn.functional.mse_loss(model(x), y, reduction="sum").item()
            count += len(x)
    model.train()
    return total / count


def main() -> None:
    torch.manual_seed(0)
    train = DataLoader(
        IdDataset(int(os.environ.get("ZOO_SAMPLES", "48"))), batch_size=4, shuffle=True
    )
    _ids, sample, _y = next(iter(train))  # peek: the model's input width
    model = nn.Sequential(
        nn.Linear(sample.shape[1], 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    val = DataLoader(IdDataset(16), batch_size=8)
    for epoch in range(int(os.environ.get("ZOO_EPOCHS", "3"))):
        for ids, x, y in train:
            log_batch(0, epoch, ids)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"epoch {epoch} val {evaluate(model, val):.6f}", flush=True)
    save_params(model)


if __name__ == "__main__":
    main()
