"""Step loop over ``range``: ``for step in range(N): batch = next(it)``, re-iterating at the end.

Single process, shuffled DataLoader, dropout, Adam, a per-step LambdaLR that reads ``step``
through the scheduler; the loop ends after N optimizer steps, in the middle of a pass.
Unmodified: knows nothing about Lattice.
"""

from __future__ import annotations

import os

import torch
from _zoo import IdDataset, log_batch, save_params
from torch import nn
from torch.utils.data import DataLoader


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.05 * s))
    data = IdDataset(int(os.environ.get("ZOO_SAMPLES", "48")))
    loader = DataLoader(data, batch_size=4, shuffle=True)
    steps = int(os.environ.get("ZOO_STEPS", "40"))
    it = iter(loader)
    for step in range(steps):
        try:
            ids, x, y = next(it)
        except StopIteration:
            it = iter(loader)
            ids, x, y = next(it)
        log_batch(0, step, ids)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    save_params(model)


if __name__ == "__main__":
    main()
