"""A small ResNet on synthetic images: a plain torchrun-style DDP script, no Lattice import.

Run it with `torchrun`, `lattice run`, or as the example TrainingJob. It downloads nothing:
the data set is generated from a fixed seed. Sizes come from the environment so tests can
make it tiny: EPOCHS (default 3), SAMPLES (default 2048), BATCH (default 32 per worker),
STEP_SLEEP (seconds to pause per step; slows the demo down so a person can watch).
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler


class Block(nn.Module):
    def __init__(self, channels_in: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.skip = (
            nn.Sequential()
            if stride == 1 and channels_in == channels
            else nn.Sequential(
                nn.Conv2d(channels_in, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.skip(x))


class ResNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.layers = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2))
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def synthetic_images(samples: int, seed: int = 0) -> TensorDataset:
    """Images whose class is a learnable pattern (mean colour per class) plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (samples,), generator=g)
    centers = torch.randn(10, 3, 1, 1, generator=g)
    images = centers[labels] + 0.8 * torch.randn(samples, 3, 16, 16, generator=g)
    return TensorDataset(images, labels)


def main() -> None:
    epochs = int(os.environ.get("EPOCHS", "3"))
    samples = int(os.environ.get("SAMPLES", "2048"))
    batch = int(os.environ.get("BATCH", "32"))
    pause = float(os.environ.get("STEP_SLEEP", "0"))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DistributedDataParallel(ResNet())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    data = synthetic_images(samples)
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=batch, sampler=sampler)
    loss = torch.tensor(float("nan"))  # a run resumed after its last step trains no batch
    round_ = os.environ.get("LATTICE_ROUND", "-")
    if rank == 0:
        print(f"start world={world} round={round_} epochs={epochs} samples={samples}", flush=True)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        model.train()
        for step, (x, y) in enumerate(loader):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if rank == 0 and step % 10 == 0:
                print(
                    f"epoch={epoch} step={step} loss={loss.item():.4f} world={world} "
                    f"round={round_}",
                    flush=True,
                )
            if pause:
                time.sleep(pause)
        scheduler.step()
    if rank == 0:
        print(f"done world={world} round={round_} final_loss={loss.item():.4f}", flush=True)
    del model  # free DDP before its process group (see examples/ddp_train.py)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
