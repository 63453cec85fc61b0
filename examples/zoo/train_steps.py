"""Step-count loop: ``step = 0; while step < N: for batch in loader: ...; step += 1``.

Single process, shuffled DataLoader, dropout, Adam; the loop ends after N optimizer steps, in
the middle of a pass. Unmodified: knows nothing about Lattice (``step`` is a local of this
function: the addon restores it, docs/addon.md "The script's own counters").
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
    data = IdDataset(int(os.environ.get("ZOO_SAMPLES", "48")))
    loader = DataLoader(data, batch_size=4, shuffle=True)
    steps = int(os.environ.get("ZOO_STEPS", "30"))
    if os.environ.get("ZOO_WARMUP_STEP"):  # one optimizer step on a dummy batch first
        model(torch.ones(4, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    step = 0
    while step < steps:
        for ids, x, y in loader:
            log_batch(0, step, ids)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= steps:
                break
    save_params(model)


if __name__ == "__main__":
    main()
