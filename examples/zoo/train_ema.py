"""An EMA of the weights with `torch.optim.swa_utils.AveragedModel`, updated every step.

Single process, shuffled DataLoader, Adam, dropout. The EMA model is a copy the optimizer
never sees, so it must be captured on its own. Unmodified: knows nothing about Lattice.
"""

from __future__ import annotations

import os

import torch
from _zoo import IdDataset, log_batch, save_params
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    data = IdDataset(int(os.environ.get("ZOO_SAMPLES", "48")))
    loader = DataLoader(data, batch_size=4, shuffle=True)
    for epoch in range(int(os.environ.get("ZOO_EPOCHS", "3"))):
        for ids, x, y in loader:
            log_batch(0, epoch, ids)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ema.update_parameters(model)
    save_params(nn.ModuleDict({"model": model, "ema": ema}))


if __name__ == "__main__":
    main()
