"""An Accelerate loop (Hugging Face's "no_trainer" examples): ``accelerator.prepare`` wraps the
model, optimizer, DataLoader and scheduler; ``accelerator.backward``; dropout, AdamW, a per-step
scheduler; DDP over gloo when WORLD_SIZE > 1; ``ZOO_ACCUMULATE=N``: accelerate's gradient
accumulation (``accelerator.accumulate``); ``ZOO_DATASET=iterable``: an IterableDataset, which
accelerate dispatches (rank 0 reads every batch and sends each rank its slice). Unmodified:
knows nothing about Lattice.
"""

from __future__ import annotations

import os

import torch
from _zoo import IdDataset, log_batch, save_params
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, IterableDataset


class Items(IterableDataset):
    """The samples in a fixed order (a stream with no shuffle)."""

    def __init__(self, n: int) -> None:
        self.items = IdDataset(n)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return (self.items[i] for i in range(len(self.items)))


def main() -> None:
    accumulate = int(os.environ.get("ZOO_ACCUMULATE", "1"))  # accelerate's own accumulation
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    rank = accelerator.process_index
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
    samples = int(os.environ.get("ZOO_SAMPLES", "48"))
    batch = int(os.environ.get("ZOO_BATCH", "4"))
    if os.environ.get("ZOO_DATASET") == "iterable":
        loader = DataLoader(Items(samples), batch_size=batch)
    else:
        loader = DataLoader(IdDataset(samples), batch_size=batch, shuffle=True)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    for epoch in range(int(os.environ.get("ZOO_EPOCHS", "3"))):
        for ids, x, y in loader:
            log_batch(rank, epoch, ids)
            with accelerator.accumulate(model):
                loss = nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
    if rank == 0:
        save_params(accelerator.unwrap_model(model))
    accelerator.end_training()


if __name__ == "__main__":
    main()
