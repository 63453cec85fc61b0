"""A PyTorch Lightning script: a ``LightningModule`` with dropout, Adam and a per-epoch
scheduler, ``Trainer.fit`` on CPU (DDP over gloo when WORLD_SIZE > 1, Lightning's own
DistributedSampler), a shuffled DataLoader. ``ZOO_ACCUMULATE=N``: Lightning's gradient
accumulation, a per-step scheduler, and ``max_steps`` ending the run mid-epoch.
``ZOO_VAL=1``: a validation DataLoader run twice an epoch (``val_check_interval``) and
``EarlyStopping`` on its loss (it ends the run at the end of epoch 2 of 4, its patience counted
across epoch 2's two validations). ``ZOO_DATAMODULE=1``: the loaders come from a
``LightningDataModule`` (training with two workers), and Lightning's default logger and
``ModelCheckpoint`` are on. ``ZOO_CKPT_PATH=1``: Lightning's own resume, as its docs show it: a
``ModelCheckpoint(save_last=True)`` every 5 steps (beside $ZOO_OUT) and ``fit(ckpt_path="last")``.
``ZOO_DATASET=stream``: the training data an IterableDataset that keeps its own state
(`train_stream.Stream`; no length: Lightning's fetcher reads it a batch ahead).
Unmodified: knows nothing about Lattice.
"""

from __future__ import annotations

import os

import lightning as L
import torch
from _zoo import IdDataset, log_batch, save_params
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader
from train_stream import Stream

ACCUMULATE = int(os.environ.get("ZOO_ACCUMULATE", "1"))


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
        self.training_step_outputs: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        ids, x, y = batch
        log_batch(self.global_rank, self.current_epoch, ids)
        loss = nn.functional.mse_loss(self.net(x), y)
        self.training_step_outputs.append(loss.detach())
        return loss

    def on_train_epoch_start(self) -> None:  # an IterableDataset's epoch is the script's to set
        dataset = self.trainer.train_dataloader.dataset
        if callable(getattr(dataset, "set_epoch", None)):
            dataset.set_epoch(self.current_epoch)

    def on_train_epoch_end(self) -> None:  # Lightning's documented pattern
        self.log("train_loss_epoch", torch.stack(self.training_step_outputs).mean())
        self.training_step_outputs.clear()

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        _, x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        opt = torch.optim.Adam(self.parameters(), lr=0.01)
        if ACCUMULATE > 1:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
            return [opt], [{"scheduler": sched, "interval": "step"}]
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


class Data(L.LightningDataModule):
    """The loaders made by Lightning's calls (workers prefetching for training)."""

    def __init__(self, validate: bool) -> None:
        super().__init__()
        self.validate = validate

    def setup(self, stage: str) -> None:
        self.train, self.val = IdDataset(48), IdDataset(8)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=4, shuffle=True, num_workers=2)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=4) if self.validate else []


def main() -> None:
    L.seed_everything(0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate = os.environ.get("ZOO_VAL") == "1"
    own_resume = os.environ.get("ZOO_CKPT_PATH") == "1"
    callbacks: list[L.Callback] = []
    if validate:
        callbacks.append(EarlyStopping("val_loss", min_delta=0.05, patience=2))
    if own_resume:
        where = os.environ["ZOO_OUT"] + ".ckpts"
        callbacks.append(ModelCheckpoint(where, save_last=True, every_n_train_steps=5))
    model = Regressor()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=(local := int(os.environ.get("LOCAL_WORLD_SIZE", world))),
        num_nodes=world // local,
        strategy="ddp" if world > 1 else "auto",
        max_epochs=4 if validate else int(os.environ.get("ZOO_EPOCHS", "3")),
        max_steps=15 if ACCUMULATE > 1 else -1,
        accumulate_grad_batches=ACCUMULATE,
        val_check_interval=0.5 if validate else None,
        callbacks=callbacks,
        logger=(defaults := os.environ.get("ZOO_DATAMODULE") == "1"),
        enable_checkpointing=defaults or own_resume,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if os.environ.get("ZOO_DATAMODULE") == "1":
        trainer.fit(model, datamodule=Data(validate), ckpt_path="last" if own_resume else None)
    else:
        samples = int(os.environ.get("ZOO_SAMPLES", "48"))
        batch = int(os.environ.get("ZOO_BATCH", "4"))
        if os.environ.get("ZOO_DATASET") == "stream":
            rank = int(os.environ.get("RANK", "0"))
            loader = DataLoader(Stream(samples, rank, world), batch_size=batch)
        else:
            loader = DataLoader(IdDataset(samples), batch_size=batch, shuffle=True)
        val = DataLoader(IdDataset(8), batch_size=4) if validate else None
        trainer.fit(model, loader, val, ckpt_path="last" if own_resume else None)
    if trainer.global_rank == 0:
        save_params(model.net)


if __name__ == "__main__":
    main()
