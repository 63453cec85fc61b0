"""Single process, DataLoader(num_workers=2, shuffle=True) (a RandomSampler), dropout, Adam.

``ZOO_GENERATOR=1``: the shuffle draws from a seeded generator of its own; ``ZOO_PERSISTENT=1``:
``persistent_workers=True``; ``ZOO_SAMPLER=weighted``: a ``WeightedRandomSampler`` (class
imbalance: draws with replacement, from the global RNG), ``subset``: a ``SubsetRandomSampler``
over two thirds of the samples.

Run as `python train_workers.py` or under `lattice run`. Unmodified: knows nothing about Lattice.
"""

from __future__ import annotations

import os

import torch
from _zoo import IdDataset, log_batch, save_params
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler, WeightedRandomSampler


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    data = IdDataset(int(os.environ.get("ZOO_SAMPLES", "48")))
    seeded = torch.Generator().manual_seed(42) if os.environ.get("ZOO_GENERATOR") == "1" else None
    persistent = os.environ.get("ZOO_PERSISTENT") == "1"
    kind, n = os.environ.get("ZOO_SAMPLER"), len(data)
    sampler = None
    if kind == "weighted":
        weights = [1.0 + i % 3 for i in range(n)]
        sampler = WeightedRandomSampler(weights, num_samples=n, generator=seeded)
    elif kind == "subset":
        sampler = SubsetRandomSampler([i for i in range(n) if i % 3], generator=seeded)
    loader = DataLoader(
        data,
        batch_size=4,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=2,
        generator=seeded if sampler is None else None,
        persistent_workers=persistent,
    )
    for epoch in range(int(os.environ.get("ZOO_EPOCHS", "3"))):
        for ids, x, y in loader:
            log_batch(0, epoch, ids)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_params(model)


if __name__ == "__main__":
    main()
