"""Every LR scheduler is tracked and held still in a fast-forward (`patches.patch_schedulers`).

Runs in a subprocess: the patch changes torch's classes for the rest of a process.
"""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = r"""
import json, types, weakref
import torch
from torch.optim import lr_scheduler as L
from lattice.addon import patches

rt = types.SimpleNamespace(schedulers=[], suppress_scheduler=False)
patches.patch_schedulers(rt)
opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
warm = L.LinearLR(opt, start_factor=0.5, total_iters=2)
cos = L.CosineAnnealingLR(opt, T_max=10)
seq = L.SequentialLR(opt, [warm, cos], milestones=[2])
plateau = L.ReduceLROnPlateau(opt)
restarts = L.CosineAnnealingWarmRestarts(opt, T_0=3)


class Mine(L.LRScheduler):  # a script's own, defined after the patch
    def __init__(self, optimizer):
        self.calls = 0
        super().__init__(optimizer)

    def step(self, *args):
        self.calls += 1
        return super().step(*args)

    def get_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]


mine = Mine(opt)
tracked = [type(r()).__name__ for r in rt.schedulers]
before = [seq.last_epoch, plateau.last_epoch, restarts.T_cur, mine.calls]
rt.suppress_scheduler = True
seq.step(); plateau.step(1.0); restarts.step(); mine.step()
held = [seq.last_epoch, plateau.last_epoch, restarts.T_cur, mine.calls]
rt.suppress_scheduler = False
seq.step(); plateau.step(1.0); restarts.step(); mine.step()
moved = [seq.last_epoch, plateau.last_epoch, restarts.T_cur, mine.calls]
print(json.dumps({"tracked": tracked, "before": before, "held": held, "moved": moved}))
"""


def test_every_scheduler_is_tracked_and_held_in_a_fast_forward() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    # SequentialLR and ReduceLROnPlateau never call LRScheduler.__init__: tracked all the same
    assert got["tracked"] == [
        "LinearLR",
        "CosineAnnealingLR",
        "SequentialLR",
        "ReduceLROnPlateau",
        "CosineAnnealingWarmRestarts",
        "Mine",
    ]
    assert got["held"] == got["before"]  # their own step methods did nothing
    assert [m - b for m, b in zip(got["moved"], got["before"], strict=True)] == [1, 1, 1, 1]
