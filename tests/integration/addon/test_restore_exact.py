"""Kill -9 mid-epoch, restart: the final parameters are bitwise those of an uninterrupted run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lattice.addon.protocol import CHECKPOINT_AND_EXIT, SAFEPOINT_EXIT

from .harness import Launcher, bitwise_equal, id_lines, params, poll

# script, world size, batches logged (by rank 0) before the kill
CASES = [
    ("train_epochs.py", 2, 8),  # epoch loop, set_epoch, per-epoch scheduler
    ("train_accum.py", 2, 11),  # per-step scheduler, dropout, accumulation (odd → mid-window)
    ("train_workers.py", 1, 17),  # num_workers=2, RandomSampler
    ("train_amp.py", 1, 13),  # autocast float16 + GradScaler("cpu") with skipped steps
    ("train_ema.py", 1, 15),  # AveragedModel EMA updated every step (not in the optimizer)
    ("train_eval.py", 1, 17),  # a validation DataLoader every epoch, metric = sum / count
    ("train_trainer.py", 1, 11),  # transformers.Trainer: tiny GPT-2, accumulation; mid-epoch
    ("train_trainer.py", 1, 9),  # … restored at the end of an epoch (8 steps per epoch)
    ("train_trainer.py", 2, 7),  # … two processes (DDP over gloo), 4 steps per epoch
]


def baseline(launcher: Launcher, script: str, world: int) -> Path:
    out = launcher.tmp / "baseline.pt"
    run = launcher.start(
        script, world, lattice=False, ZOO_OUT=str(out), ZOO_LOG=str(launcher.tmp / "base")
    )
    assert run.wait() == [0] * world, run.output()
    return out


@pytest.mark.parametrize(("script", "world", "kill_after"), CASES)
def test_kill_and_restart_is_bitwise_exact(
    launcher: Launcher, script: str, world: int, kill_after: int
) -> None:
    expected = baseline(launcher, script, world)
    out = launcher.tmp / "resumed.pt"
    first = launcher.start(
        script, world, ZOO_OUT=str(out), LATTICE_CHECKPOINT_EVERY="1", ZOO_STEP_SLEEP="0.1"
    )
    poll(lambda: len(id_lines(launcher.tmp)) >= kill_after, "training progress")
    first.kill()
    assert not out.exists(), "the first run finished before it was killed"
    second = launcher.start(script, world, ZOO_OUT=str(out), LATTICE_CHECKPOINT_EVERY="1")
    assert second.wait() == [0] * world, second.output()
    assert "restored step" in second.output()
    assert bitwise_equal(params(expected), params(out))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_newest_checkpoint_falls_back_to_previous(launcher: Launcher, damage: str) -> None:
    expected = baseline(launcher, "train_epochs.py", 2)
    out = launcher.tmp / "resumed.pt"
    first = launcher.start(
        "train_epochs.py", 2, ZOO_OUT=str(out), LATTICE_CHECKPOINT_EVERY="1", ZOO_STEP_SLEEP="0.1"
    )
    poll(lambda: len(id_lines(launcher.tmp)) >= 8, "training progress")
    (launcher.tmp / "control").write_text(CHECKPOINT_AND_EXIT)  # stop with whole checkpoints
    assert first.wait() == [SAFEPOINT_EXIT] * 2, first.output()
    (launcher.tmp / "control").unlink()
    steps = sorted((launcher.tmp / "local").glob("step-*"))
    newest = steps[-1]
    victim = newest / ("state.pt" if damage == "flip" else "rng-1.pt")
    raw = bytearray(victim.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
    else:
        raw = raw[: len(raw) // 2]
    victim.write_bytes(bytes(raw))
    second = launcher.start("train_epochs.py", 2, ZOO_OUT=str(out), LATTICE_CHECKPOINT_EVERY="1")
    assert second.wait() == [0, 0], second.output()
    log = second.output()
    assert f"checkpoint at step {int(newest.name[5:])} unusable" in log
    assert f"restored step {int(steps[-2].name[5:])}" in log
    assert bitwise_equal(params(expected), params(out))


class NotResumedExactly(Exception):
    """The restarted run's final parameters differ from the uninterrupted run's."""


@pytest.mark.xfail(
    strict=True,
    raises=NotResumedExactly,
    reason="a step-count loop's counter is a local of the script: a new process starts it at 0 "
    "again, so the restored run makes N more steps (docs/addon.md, Not supported)",
)
def test_step_count_loop_is_not_resumed_exactly(launcher: Launcher) -> None:
    steps = 30  # train_steps.py's default: 2.5 passes of 12 batches
    expected = baseline(launcher, "train_steps.py", 1)
    out = launcher.tmp / "resumed.pt"
    first = launcher.start(
        "train_steps.py", 1, ZOO_OUT=str(out), LATTICE_CHECKPOINT_EVERY="1", ZOO_STEP_SLEEP="0.1"
    )
    poll(lambda: len(id_lines(launcher.tmp)) >= 15, "training progress")
    first.kill()
    assert not out.exists(), "the first run finished before it was killed"
    after = launcher.tmp / "after"
    second = launcher.start(
        "train_steps.py", 1, ZOO_OUT=str(out), ZOO_LOG=str(after), LATTICE_CHECKPOINT_EVERY="1"
    )
    assert second.wait() == [0], second.output()
    found = re.search(r"restored step (\d+)", second.output())
    assert found, second.output()
    restored = int(found.group(1))
    assert 0 < restored < steps
    # What the addon does restore: the state, and the data position (the first batch after the
    # restore is the uninterrupted run's batch number `restored`, same samples).
    resumed = (launcher.tmp / "after.0").read_text().splitlines()
    uninterrupted = (launcher.tmp / "base.0").read_text().splitlines()
    assert resumed[0].split()[1:] == uninterrupted[restored].split()[1:]
    # What it does not: the script's own counter, so the loop makes `steps` more steps.
    assert len(resumed) == steps
    if not bitwise_equal(params(expected), params(out)):
        raise NotResumedExactly(f"restored step {restored}, then {len(resumed)} more steps")
