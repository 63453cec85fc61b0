"""No DataLoader: the script draws its own batches (nanoGPT's ``get_batch``), in a step loop.

A ``while iter_num < N`` loop at module level, with ``ZOO_LOOP=range`` a ``for it in range(N)``
loop (the "let's build GPT" script's), with ``ZOO_LOOP=prefetch`` nanoGPT's own loop (the next
batch drawn right after the forward, into module globals), random batch indices from
the global torch RNG, dropout, AdamW, a per-step LambdaLR after ``optimizer.step()``; DDP over
gloo when WORLD_SIZE > 1; with ``ZOO_EVAL_EVERY=K`` a validation DataLoader every K steps;
with ``ZOO_COMPILE=1`` the model is ``torch.compile``d before DDP wraps it, as nanoGPT does;
with ``ZOO_EMA=1`` a deep copy of the model in a module global is lerped towards it after
each step (an EMA); with ``ZOO_ESTIMATE_EVERY=K`` nanoGPT's ``estimate_loss()`` (a ``range``
loop under ``torch.no_grad``) runs on rank 0 only at the top of every K-th iteration; with
``ZOO_RESUME=1`` the script checkpoints itself every 5 iterations (model, optimizer, scheduler,
``iter_num``, beside $ZOO_OUT) and resumes from that at its start, as nanoGPT's
``init_from='resume'`` does. Unmodified: knows nothing about Lattice.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from _zoo import IdDataset, log_batch, save_params
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    dist.init_process_group("gloo")
rank = dist.get_rank() if world > 1 else 0
torch.manual_seed(0)
data = IdDataset(int(os.environ.get("ZOO_SAMPLES", "48")))
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
compiled = torch.compile(model) if os.environ.get("ZOO_COMPILE") == "1" else model  # nanoGPT's
net = DistributedDataParallel(compiled) if world > 1 else compiled
ema = copy.deepcopy(model) if os.environ.get("ZOO_EMA") == "1" else None
torch.manual_seed(100 + rank)  # each rank draws its own batches


def get_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(len(data), (4,))
    return ids, data.x[ids], data.y[ids]


max_iters = int(os.environ.get("ZOO_STEPS", "30"))


eval_every = int(os.environ.get("ZOO_EVAL_EVERY", "0"))
val = DataLoader(IdDataset(8), batch_size=4) if eval_every else []  # an evaluation loader


estimate_every = int(os.environ.get("ZOO_ESTIMATE_EVERY", "0"))


@torch.no_grad()
def estimate_loss() -> float:
    """nanoGPT's: a few batches of its own, on the master process only."""
    model.eval()
    losses = torch.zeros(3)
    for k in range(3):
        ids = torch.arange(k, k + 4)
        losses[k] = nn.functional.mse_loss(model(data.x[ids]), data.y[ids]).item()
    model.train()
    return float(losses.mean())


def train_step(iter_num: int) -> None:
    if estimate_every and iter_num % estimate_every == 0 and rank == 0:
        estimate_loss()
    ids, x, y = get_batch()
    log_batch(rank, iter_num, ids)
    loss = nn.functional.mse_loss(net(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    if ema is not None:
        with torch.no_grad():
            for e, m in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(m, 0.1)
    if eval_every and (iter_num + 1) % eval_every == 0:
        with torch.no_grad():
            for _, vx, vy in val:
                nn.functional.mse_loss(model(vx), vy)


loop = os.environ.get("ZOO_LOOP", "while")
if loop == "range":
    for it in range(max_iters):
        train_step(it)
elif loop == "prefetch":  # nanoGPT's own loop: the next batch is drawn inside this step
    iter_num = 0
    ids, x, y = get_batch()
    while True:
        log_batch(rank, iter_num, ids)
        loss = nn.functional.mse_loss(net(x), y)
        ids, x, y = get_batch()  # right after the forward, as nanoGPT does
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        iter_num += 1
        if iter_num >= max_iters:
            break
else:
    iter_num = 0
    own = os.environ.get("ZOO_OUT", "out.pt") + ".own.pt"  # ZOO_RESUME=1: nanoGPT's resume
    if os.environ.get("ZOO_RESUME") == "1" and os.path.exists(own):
        saved = torch.load(own)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        iter_num = saved["iter_num"]
    while iter_num < max_iters:
        train_step(iter_num)
        iter_num += 1
        if os.environ.get("ZOO_RESUME") == "1" and iter_num % 5 == 0 and rank == 0:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
            state |= {"scheduler": sched.state_dict(), "iter_num": iter_num}
            torch.save(state, own + ".tmp")
            os.replace(own + ".tmp", own)
if rank == 0:
    save_params(model if ema is None else nn.ModuleDict({"model": model, "ema": ema}))
if world > 1:
    dist.destroy_process_group()
