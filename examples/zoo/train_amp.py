"""Mixed precision on CPU: `torch.autocast("cpu", float16)` + `torch.amp.GradScaler("cpu")`.

The scaler starts high and grows fast, so some steps overflow (skipped by the scaler, its scale
backs off) and others grow it: its state matters for the result. Single process, shuffled
DataLoader, dropout, AdamW, per-step scheduler. Unmodified: knows nothing about Lattice.
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
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.98)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**18, growth_interval=2)
    data = IdDataset(int(os.environ.get("ZOO_SAMPLES", "48")))
    loader = DataLoader(data, batch_size=4, shuffle=True)
    skipped = 0
    for epoch in range(int(os.environ.get("ZOO_EPOCHS", "3"))):
        for ids, x, y in loader:
            log_batch(0, epoch, ids)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x).float(), y) * 100
            opt.zero_grad()
            scaler.scale(loss).backward()
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            skipped += int(scaler.get_scale() < before)
            sched.step()
    print(f"scale {scaler.get_scale()} skipped {skipped}", flush=True)
    save_params(model)


if __name__ == "__main__":
    main()
