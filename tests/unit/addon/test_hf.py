"""The addon's transformers.Trainer glue: RNG in Trainer's layout, autopatch parsing."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lattice.addon import hf, settings, state


def test_rng_in_trainer_layout_round_trips_through_trainers_loader(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    pt_utils = pytest.importorskip("transformers.trainer_pt_utils")
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    captured = state.capture_rng()
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    path = tmp_path / "rng_state.pth"
    torch.save(hf._trainer_rng(captured, distributed=False), path)
    with pt_utils.safe_globals():  # what Trainer._load_rng_state does
        loaded = torch.load(path, weights_only=True)
    random.setstate(loaded["python"])
    np.random.set_state(loaded["numpy"])
    torch.random.set_rng_state(loaded["cpu"])
    assert (random.random(), float(np.random.rand())) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


@pytest.mark.parametrize(
    ("setting", "parts"),
    [
        (None, {"torch", "transformers"}),
        ("torch", {"torch"}),
        (" Torch , transformers ", {"torch", "transformers"}),
        ("none", {"none"}),
    ],
)
def test_autopatch_parts(setting: str | None, parts: set[str]) -> None:
    env = {} if setting is None else {"LATTICE_AUTOPATCH": setting}
    assert settings.autopatch_parts(env) == parts
