"""Safe points and resizes: 2 → 3 → 2 ranks mid-epoch, every sample exactly once per epoch."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from lattice.addon import sharded
from lattice.addon.local_tier import step_dir
from lattice.addon.protocol import CHECKPOINT_AND_EXIT, SAFEPOINT_EXIT

from .harness import Launcher, assemble, bitwise_equal, id_lines, params, poll

SAMPLES = 72  # batch 6: every prefix consumed at world 2 or 3 leaves a remainder that splits evenly
ENV = {"ZOO_SAMPLES": str(SAMPLES), "ZOO_BATCH": "6", "ZOO_STEP_SLEEP": "0.15"}
# Samples a resize may repeat in an epoch: a batch-split order padded to the new world's
# multiple (accelerate's even_batches) repeats up to world - 1 batches; nothing else repeats.
PADDED = {"train_accelerate.py": 2 * 6}


def consumed_per_epoch(tmp: Path) -> dict[int, Counter[int]]:
    seen: dict[int, Counter[int]] = {}
    for log in tmp.glob("ids.*"):
        for line in log.read_text().splitlines():
            epoch, *ids = (int(v) for v in line.split())
            seen.setdefault(epoch, Counter()).update(ids)
    return seen


def safepoint(launcher: Launcher, run_world: int, after: int) -> int:
    """Ask the running round for a safe point once rank 0 logged ``after`` batches."""
    run = launcher.runs[-1]
    poll(lambda: len(id_lines(launcher.tmp)) >= after, "training progress")
    control = launcher.tmp / "control"
    control.write_text(CHECKPOINT_AND_EXIT)
    codes = run.wait()
    control.unlink()
    assert codes == [SAFEPOINT_EXIT] * run_world, run.output()
    return len(id_lines(launcher.tmp))


@pytest.mark.parametrize(
    ("script", "env"),
    [
        ("train_epochs.py", {}),
        # Lightning counts the epoch's batches itself and ends the epoch at the loader's length:
        # after a resize, the count must be the new world's (torchelastic's env, as the agent's)
        ("train_lightning.py", {"TORCHELASTIC_RUN_ID": "zoo"}),
        # accelerate's BatchSamplerShard (each rank every world-th batch of one order): the rest
        # of the order is split anew, by batch; even_batches pads it to a multiple of the world
        # (as accelerate pads any epoch): up to 2 batches repeat at world 3 (`PADDED`)
        ("train_accelerate.py", {}),
        # Fabric re-makes the DataLoader with a DistributedSampler and sets its epoch itself
        ("train_fabric.py", {"TORCHELASTIC_RUN_ID": "zoo"}),
    ],
)
def test_resize_two_three_two_consumes_every_sample_once(
    launcher: Launcher, script: str, env: dict[str, str]
) -> None:
    out = launcher.tmp / "final.pt"
    env = {**ENV, **env}
    launcher.start(script, 2, ZOO_OUT=str(out), **env)
    steps_before = safepoint(launcher, 2, after=3)  # mid-epoch 0 (6 batches per epoch)
    second = launcher.start(script, 3, ZOO_OUT=str(out), **env)
    poll(lambda: "restored step" in second.output(), "restore at world 3")
    assert f"restored step {steps_before}" in second.output()  # the safe point lost no step
    safepoint(launcher, 3, after=steps_before + 5)  # mid-epoch 1
    third = launcher.start(script, 2, ZOO_OUT=str(out), **env)
    assert third.wait() == [0, 0], third.output()
    assert out.exists()
    seen = consumed_per_epoch(launcher.tmp)
    assert sorted(seen) == [0, 1, 2]
    padded = PADDED.get(script, 0)
    for epoch, counts in seen.items():
        assert set(counts) == set(range(SAMPLES)), f"epoch {epoch}: {counts}"
        assert sum(counts.values()) - SAMPLES <= padded, f"epoch {epoch}: {counts}"
    assert re.search(r"restored step \d+", third.output())


def whole_model(folders: list[Path]) -> dict[str, torch.Tensor]:
    """The full parameters of a sharded checkpoint: node ``i``'s folder has rank ``i``'s pieces,
    and the first one the skeleton that places them."""

    def load(path: Path) -> Any:
        return torch.load(path, weights_only=True, map_location="cpu")

    pieces = [load(f / f"shard-{r}-of-{len(folders)}.pt") for r, f in enumerate(folders)]
    return assemble(load(folders[0] / "state.pt"), pieces)


def test_fsdp_state_is_resharded_when_the_world_grows(launcher: Launcher) -> None:
    """fully_shard over 2 nodes, a safe point mid-epoch, then 3 nodes: each rank saved only
    its own pieces, they are cut again for 3 ranks (the new node has no file and receives the
    rows it needs), the restored parameters are bitwise the checkpoint's, and every sample is
    consumed once per epoch."""
    out = launcher.tmp / "final.pt"
    launcher.start("train_fsdp.py", 2, nodes=2, ZOO_OUT=str(out), **ENV)
    step = safepoint(launcher, 2, after=8)  # mid-epoch 1 (6 batches per epoch at world 2)
    folders = [step_dir(launcher.local_dir(node), step) for node in range(2)]
    # A rank's pieces are on its node, and (no service here) replicated to the next node.
    for node, other in ((0, 1), (1, 0)):
        mine, replica = (folders[node] / f"shard-{r}-of-2.pt" for r in (node, other))
        assert mine.read_bytes() == (folders[other] / mine.name).read_bytes()
        assert replica.exists()
    skeleton = torch.load(folders[0] / "state.pt", weights_only=True)["model.0"]
    assert all(sharded.PIECE in slot for slot in skeleton.values())  # no tensor of the model
    saved = whole_model(folders)
    # The script's loop ends before the checkpoint's epoch: it saves what was restored.
    peek = launcher.start("train_fsdp.py", 3, nodes=3, ZOO_OUT=str(out), ZOO_EPOCHS="1", **ENV)
    assert peek.wait() == [0, 0, 0], peek.output()
    assert f"restored step {step}" in peek.output()
    assert f"node-local checkpoint of step {step} received from rank 0" in peek.output()
    assert not (step_dir(launcher.local_dir(2), step) / "shard-1-of-2.pt").exists()
    assert bitwise_equal(saved, params(out))
    out.unlink()
    rest = launcher.start("train_fsdp.py", 3, nodes=3, ZOO_OUT=str(out), **ENV)
    assert rest.wait() == [0, 0, 0], rest.output()
    assert f"restored step {step}" in rest.output() and out.exists()
    seen = consumed_per_epoch(launcher.tmp)
    assert sorted(seen) == [0, 1, 2]
    for epoch, counts in seen.items():
        assert counts == Counter(range(SAMPLES)), f"epoch {epoch}: {counts}"
