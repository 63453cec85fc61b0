"""Work after the step: DDP, BatchNorm, dropout, AdamW, a per-step scheduler, then logging
and a pause.

A rank that dies in the pause leaves the others there too, with the step finished but its
boundary (the next batch fetch) not reached yet. Unmodified: knows nothing about Lattice.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from _zoo import IdDataset, log_batch, save_params
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1)
    )
    # Without the broadcast, a forward starts without a collective: the BatchNorm statistics
    # move before the gradients' all-reduce can fail.
    model = DistributedDataParallel(net, broadcast_buffers=False)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + 0.05 * step))
    data = IdDataset(int(os.environ.get("ZOO_SAMPLES", "64")))
    sampler = DistributedSampler(data, shuffle=True, seed=3)
    loader = DataLoader(data, batch_size=4, sampler=sampler)
    pause = float(os.environ.get("ZOO_AFTER_STEP_SLEEP", "0"))
    done = 0
    for epoch in range(int(os.environ.get("ZOO_EPOCHS", "3"))):
        sampler.set_epoch(epoch)
        for ids, x, y in loader:
            log_batch(rank, epoch, ids)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            steps_log = os.environ.get("ZOO_STEPS_LOG")
            if steps_log:
                with open(f"{steps_log}.{rank}", "a") as fh:
                    fh.write(f"{done}\n")
            time.sleep(pause)
    if rank == 0:
        save_params(model.module)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
