"""Shared bits of the zoo scripts: a dataset whose items carry their sample id, and logging."""

from __future__ import annotations

import os
import time

import torch
from torch.utils.data import Dataset


class IdDataset(Dataset):
    """Item ``i`` is ``(i, x_i, y_i)``, a deterministic function of ``i``."""

    def __init__(self, n: int, features: int = 8) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, features, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True).sin()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        return i, self.x[i], self.y[i]


_batches = 0  # logged by this process


def log_batch(rank: int, epoch: int, ids: torch.Tensor) -> None:
    """Append ``epoch id id ...`` to $ZOO_LOG.<rank>, then `pace`."""
    path = os.environ.get("ZOO_LOG")
    if path:
        with open(f"{path}.{rank}", "a") as fh:
            fh.write(f"{epoch} {' '.join(str(int(i)) for i in ids)}\n")
    pace()


def pace() -> None:
    """Once a batch: sleep $ZOO_STEP_SLEEP. ``ZOO_DIE_AT=N``: the process ends at its N-th
    call as kill -9 would end it (no handler runs), at a point known in advance."""
    global _batches
    _batches += 1
    if _batches == int(os.environ.get("ZOO_DIE_AT", "0")):
        os._exit(137)
    time.sleep(float(os.environ.get("ZOO_STEP_SLEEP", "0")))


def save_params(model: torch.nn.Module) -> None:
    out = os.environ.get("ZOO_OUT")
    if out:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)
