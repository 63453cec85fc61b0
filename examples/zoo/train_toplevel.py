"""A tutorial-style script: no function, the step loop at module level.

``for step in range(N): batch = next(it)`` over a shuffled DataLoader, dropout, Adam; ``step``
and the loader iterator are globals of the script. Unmodified: knows nothing about Lattice.
"""

from __future__ import annotations

import os

import torch
from _zoo import IdDataset, log_batch, save_params
from torch import nn
from torch.utils.data import DataLoader

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
opt = torch.optim.Adam(model.parameters(), lr=0.01)
loader = DataLoader(IdDataset(int(os.environ.get("ZOO_SAMPLES", "48"))), batch_size=4, shuffle=True)
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
save_params(model)
