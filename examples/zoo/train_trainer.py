"""transformers.Trainer: a tiny GPT-2 built from a config (nothing downloaded), a synthetic
dataset of dicts, dropout, gradient accumulation, a linear schedule with warm-up, several epochs.

``ZOO_RESUME=1``: Trainer's own resume, as its example scripts do it: a checkpoint folder every 5
steps (in $ZOO_OUT.ckpts) and ``train(resume_from_checkpoint=get_last_checkpoint(...))``.

Run with `python train_trainer.py` or under `lattice run`. Unmodified: knows nothing about
Lattice (the progress callback only logs, and paces the run: `_zoo.pace`).
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from _zoo import pace, save_params
from torch.utils.data import Dataset
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

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
        pace()


def main() -> None:
    set_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=LENGTH)
    model = GPT2LMHeadModel(config)
    own_resume = os.environ.get("ZOO_RESUME") == "1"
    with tempfile.TemporaryDirectory() as scratch:
        out = os.environ["ZOO_OUT"] + ".ckpts" if own_resume else scratch
        args = TrainingArguments(
            output_dir=out,
            max_steps=int(os.environ.get("ZOO_STEPS", "20")),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            learning_rate=5e-3,
            warmup_steps=3,
            lr_scheduler_type="linear",
            weight_decay=0.01,
            save_strategy="steps" if own_resume else "no",
            save_steps=5,
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
        last = get_last_checkpoint(out) if own_resume and os.path.isdir(out) else None
        trainer.train(resume_from_checkpoint=last)
    if int(os.environ.get("RANK", "0")) == 0:
        save_params(model)


if __name__ == "__main__":
    main()
