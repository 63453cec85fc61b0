"""transformers.Trainer: a tiny GPT-2 built from a config (nothing downloaded), a synthetic
dataset of dicts, dropout, gradient accumulation, a linear schedule with warm-up, several epochs.

Run with `python train_trainer.py` or under `lattice run`. Unmodified: knows nothing about
Lattice (the progress callback only logs, and paces the run by $ZOO_STEP_SLEEP).
"""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from _zoo import save_params
from torch.utils.data import Dataset
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

VOCAB, LENGTH = 128, 16


class Tokens(Dataset):
    """Item ``i``: a deterministic token sequence (a noisy ramp), labelled with itself."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(1234)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        noise = torch.randint(0, 3, (n, LENGTH), generator=g)
        self.ids = (start + torch.arange(LENGTH) + noise) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Progress(TrainerCallback):
    """Appends ``global_step`` to $ZOO_LOG.<rank> after each optimizer step."""

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        path = os.environ.get("ZOO_LOG")
        if path:
            with open(f"{path}.{os.environ.get('RANK', '0')}", "a") as fh:
                fh.write(f"{state.epoch:.3f} {state.global_step}\n")
        time.sleep(float(os.environ.get("ZOO_STEP_SLEEP", "0")))


def main() -> None:
    set_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=LENGTH)
    model = GPT2LMHeadModel(config)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=int(os.environ.get("ZOO_STEPS", "20")),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            learning_rate=5e-3,
            warmup_steps=3,
            lr_scheduler_type="linear",
            weight_decay=0.01,
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=0,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=Tokens(int(os.environ.get("ZOO_SAMPLES", "64"))),
            callbacks=[Progress()],
        )
        trainer.train()
    if int(os.environ.get("RANK", "0")) == 0:
        save_params(model)


if __name__ == "__main__":
    main()
