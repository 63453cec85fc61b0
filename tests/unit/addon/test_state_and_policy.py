from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lattice.addon import data, protocol, runtime, state
from lattice.common.errors import UserError


def test_rng_state_survives_a_weights_only_roundtrip() -> None:
    saved = state.loads(state.dumps(state.capture_rng()))
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    state.restore_rng(saved)
    assert (random.random(), float(np.random.rand())) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def test_detached_copy_does_not_alias() -> None:
    t = torch.ones(3)
    copy = state.detached_copy({"a": [t, (t, 1)], "b": "s"})
    t.add_(1)
    assert torch.equal(copy["a"][0], torch.ones(3)) and copy["a"][1][1] == 1 and copy["b"] == "s"


@pytest.mark.parametrize(
    ("raw", "parsed"), [(None, ("auto", 0.0)), ("5", ("steps", 5.0)), ("30s", ("seconds", 30.0))]
)
def test_parse_every(raw: str | None, parsed: tuple[str, float]) -> None:
    assert runtime.parse_every(raw) == parsed


@pytest.mark.parametrize("raw", ["0", "-3", "fast", "0s"])
def test_parse_every_rejects_nonsense(raw: str) -> None:
    with pytest.raises(UserError, match="LATTICE_CHECKPOINT_EVERY"):
        runtime.parse_every(raw)


@pytest.mark.parametrize(("old", "new", "consumed"), [(2, 3, 12), (3, 2, 18), (2, 4, 4), (4, 1, 0)])
def test_resplit_covers_the_remainder_exactly_once(old: int, new: int, consumed: int) -> None:
    dataset = list(range(60))
    samplers = [
        torch.utils.data.distributed.DistributedSampler(dataset, new, r, shuffle=True, seed=5)
        for r in range(new)
    ]
    order = data._distributed_order(samplers[0])
    shares = [data._split(order[consumed:], s) for s in samplers]
    assert sorted(i for share in shares for i in share) == sorted(order[consumed:])
    assert len({len(s) for s in shares}) == 1


def test_autopatch_switch() -> None:
    assert not runtime.autopatch_enabled({})
    assert not runtime.autopatch_enabled({"LATTICE_JOB": "j", "LATTICE_AUTOPATCH": "none"})
    assert runtime.autopatch_enabled({"LATTICE_JOB": "j"})
    assert protocol.SAFEPOINT_EXIT == 83
