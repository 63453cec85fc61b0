"""A GAN without a DataLoader: two optimizers stepped one after the other in each iteration
(the discriminator's, then the generator's on the same fake batch, as DCGAN does), real
samples drawn by index from the torch RNG, noise, dropout; a ``while`` counter loop, or with
``ZOO_LOOP=range`` a ``for step in range(N)`` loop; ``ZOO_ORDER=g_first`` creates the
generator's optimizer first.
Unmodified: knows nothing about Lattice.
"""

from __future__ import annotations

import os

import torch
from _zoo import IdDataset, log_batch, save_params
from torch import nn

torch.manual_seed(0)
data = IdDataset(int(os.environ.get("ZOO_SAMPLES", "48")))
gen = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
disc = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Dropout(0.2), nn.Linear(16, 1))
if os.environ.get("ZOO_ORDER") == "g_first":  # created in the other order than they step
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.999))
else:
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3, betas=(0.5, 0.999))
bce = nn.BCEWithLogitsLoss()
ones, zeros = torch.ones(4, 1), torch.zeros(4, 1)

max_iters = int(os.environ.get("ZOO_STEPS", "30"))


def train_step(it: int) -> None:
    ids = torch.randint(len(data), (4,))
    log_batch(0, it, ids)
    fake = gen(torch.randn(4, 4))
    loss_d = bce(disc(data.x[ids]), ones) + bce(disc(fake.detach()), zeros)
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()
    loss_g = bce(disc(fake), ones)
    opt_g.zero_grad()
    loss_g.backward()
    opt_g.step()


if os.environ.get("ZOO_LOOP") == "range":
    for step in range(max_iters):
        train_step(step)
else:
    it = 0
    while it < max_iters:
        train_step(it)
        it += 1
save_params(nn.ModuleDict({"gen": gen, "disc": disc}))
