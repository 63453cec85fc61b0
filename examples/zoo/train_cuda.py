"""GPU: DDP over NCCL, dropout on the GPU (CUDA RNG), float16 autocast + GradScaler("cuda").

Deterministic (``torch.use_deterministic_algorithms``), so an interrupted run can be compared
bitwise with an uninterrupted one. Needs a CUDA device per process. Unmodified: knows nothing
about Lattice.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from _zoo import IdDataset, log_batch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler


def main() -> None:
    torch.use_deterministic_algorithms(True)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 1)).cuda()
    model = DistributedDataParallel(net, device_ids=[local])
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=1000)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**18, growth_interval=2)
    data = IdDataset(int(os.environ.get("ZOO_SAMPLES", "48")))
    sampler = DistributedSampler(data, shuffle=True, seed=7)
    loader = DataLoader(data, batch_size=4, sampler=sampler)
    for epoch in range(int(os.environ.get("ZOO_EPOCHS", "3"))):
        sampler.set_epoch(epoch)
        for ids, x, y in loader:
            log_batch(rank, epoch, ids)
            x, y = x.cuda(non_blocking=True), y.cuda(non_blocking=True)
            with torch.autocast("cuda", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x).float(), y) * 100
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
    out = os.environ.get("ZOO_OUT")
    if out and rank == 0:
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, out)
    del model
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
