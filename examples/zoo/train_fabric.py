"""A Lightning Fabric script (the loop LitGPT and other Fabric users write): ``fabric.setup``
wraps the model and optimizer, ``fabric.setup_dataloaders`` swaps in a DistributedSampler when
WORLD_SIZE > 1 (DDP over gloo) and sets its epoch itself, ``fabric.backward``; dropout, a
per-epoch scheduler made on the optimizer before ``setup``. ``ZOO_STATE=1``: LitGPT's loop, its
counter in a dict (``state["iter_num"]``) that sets the learning rate and ends the run after 30
iterations. Unmodified: knows nothing about Lattice.
"""

from __future__ import annotations

import os

import lightning as L
import torch
from _zoo import IdDataset, log_batch, save_params
from torch import nn
from torch.utils.data import DataLoader


def main() -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    fabric = L.Fabric(
        accelerator="cpu",
        devices=local,
        num_nodes=world // local,
        strategy="ddp" if world > 1 else "auto",
    )
    fabric.launch()
    fabric.seed_everything(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model, optimizer = fabric.setup(model, optimizer)
    samples = IdDataset(int(os.environ.get("ZOO_SAMPLES", "48")))
    batch = int(os.environ.get("ZOO_BATCH", "4"))
    loader = fabric.setup_dataloaders(DataLoader(samples, batch_size=batch, shuffle=True))
    state = {"model": model, "optimizer": optimizer, "iter_num": 0}  # LitGPT's, ZOO_STATE=1
    max_iters = 30
    for epoch in range(int(os.environ.get("ZOO_EPOCHS", "3"))):
        for ids, x, y in loader:
            if os.environ.get("ZOO_STATE") == "1":
                if state["iter_num"] >= max_iters:
                    break
                state["iter_num"] += 1
                for group in optimizer.param_groups:  # LitGPT's get_lr(iter_num)
                    group["lr"] = 0.01 / (1.0 + 0.1 * state["iter_num"])
            log_batch(fabric.global_rank, epoch, ids)
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            fabric.backward(loss)
            optimizer.step()
        scheduler.step()
    if fabric.global_rank == 0:
        save_params(model)


if __name__ == "__main__":
    main()
