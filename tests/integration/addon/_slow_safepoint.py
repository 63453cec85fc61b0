"""Test helper: a training loop whose checkpoint file write waits until the test says go.

Used by test_safepoint_sigterm.py to hold a process inside its safe point while the agent's
SIGTERM arrives.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lattice.addon import local_tier

original_save = local_tier.save


def save(path: Path, obj: Any) -> None:
    if path.name == "state.pt":
        Path(os.environ["SLOW_READY"]).touch()
        deadline = time.monotonic() + 60
        while not Path(os.environ["SLOW_GO"]).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    original_save(path, obj)


local_tier.save = save


def main() -> None:
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64, 1)), batch_size=4)
    for _epoch in range(3):
        for x, y in loader:
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()


if __name__ == "__main__":
    main()
