"""An EMA of the weights, updated every step: a copy the optimizer never sees.

Single process, shuffled DataLoader, Adam, dropout. ``ZOO_EMA`` picks how the EMA is kept:
``averaged`` (default) `torch.optim.swa_utils.AveragedModel`; ``holder`` a deep copy held by a
plain object with an update counter its decay ramps up with (YOLO's ``ModelEMA``); ``module``
a deep copy inside an ``nn.Module`` holder with a Python counter (timm's ``ModelEmaV3`` shape);
``copy`` a bare ``copy.deepcopy(model)`` in a local variable, lerped towards the model;
``diffusers`` diffusers' ``EMAModel`` (bare tensors, its decay warmed up by its step count).
Unmodified: knows nothing about Lattice.
"""

from __future__ import annotations

import copy
import math
import os

import torch
from _zoo import IdDataset, log_batch, save_params
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader


class ModelEMA:
    """YOLO's: the decay ramps up with the number of updates."""

    def __init__(self, model: nn.Module, decay: float = 0.9, tau: float = 5.0) -> None:
        self.ema = copy.deepcopy(model).eval()
        self.updates = 0
        self.decay = lambda x: decay * (1 - math.exp(-x / tau))
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay(self.updates)
        with torch.no_grad():
            live = model.state_dict()
            for k, v in self.ema.state_dict().items():
                if v.dtype.is_floating_point:
                    v *= d
                    v += (1 - d) * live[k].detach()


class EmaModule(nn.Module):
    """timm's ``ModelEmaV3`` shape: the copy is a submodule; a warm-up by a Python counter."""

    def __init__(self, model: nn.Module, decay: float = 0.9) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for e, m in zip(self.module.parameters(), model.parameters(), strict=True):
            e.lerp_(m, 1 - d)


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
    kind = os.environ.get("ZOO_EMA", "averaged")
    if kind == "averaged":
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    elif kind == "holder":
        holder = ModelEMA(model)
        ema = holder.ema
    elif kind == "module":
        ema = EmaModule(model)
    elif kind == "diffusers":
        from diffusers.training_utils import EMAModel

        ema_params = EMAModel(model.parameters(), decay=0.9, use_ema_warmup=True, power=0.75)
    else:
        ema = copy.deepcopy(model)
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
            if kind == "averaged":
                ema.update_parameters(model)
            elif kind == "holder":
                holder.update(model)
            elif kind == "module":
                ema.update(model)
            elif kind == "diffusers":
                ema_params.step(model.parameters())
            else:
                with torch.no_grad():
                    for e, m in zip(ema.parameters(), model.parameters(), strict=True):
                        e.lerp_(m, 0.1)
    if kind == "diffusers":
        ema = copy.deepcopy(model)
        ema_params.copy_to(ema.parameters())
    save_params(nn.ModuleDict({"model": model, "ema": ema}))


if __name__ == "__main__":
    main()
