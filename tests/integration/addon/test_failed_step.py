"""A rank killed -9 between checkpoints: the survivors save the last finished step, and the
restart loses only the step in flight, bitwise exact (failed_step.py)."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from lattice.addon import failed_step
from lattice.addon.local_tier import step_dir

from .harness import Launcher, bitwise_equal, id_lines, params, poll
from .test_restore_exact import baseline

NO_CHECKPOINTS = "1000000"  # the interval: nothing but the failed step's save is on disk


def kill_rank(
    launcher: Launcher, script: str, world: int, victim: int, after: int, **env: str
) -> tuple[int, int]:
    """Run ``script`` over ``world`` nodes, kill -9 rank ``victim`` once it logged ``after``
    batches; the others fail on their own. (The step the survivors saved, batches it took.)"""
    first = launcher.start(
        script,
        world,
        nodes=world,
        ZOO_OUT=str(launcher.tmp / "resumed.pt"),
        LATTICE_CHECKPOINT_EVERY=NO_CHECKPOINTS,
        ZOO_STEP_SLEEP="0.05",
        **env,
    )
    poll(lambda: len(id_lines(launcher.tmp, victim)) >= after, "training progress")
    os.killpg(first.procs[victim].pid, signal.SIGKILL)
    fetched = len(id_lines(launcher.tmp, victim))  # it logs each batch as it takes it
    codes = first.wait()
    assert codes[victim] == -signal.SIGKILL
    assert all(code == 1 for r, code in enumerate(codes) if r != victim), first.output()
    saved = re.findall(r"the round failed after step (\d+): saved it", first.output())
    assert len(saved) == world - 1, first.output()  # every survivor, the same step
    assert len(set(saved)) == 1
    return int(saved[0]), fetched


def restart(launcher: Launcher, script: str, **env: str) -> str:
    """The next round, with no periodic checkpoint either: its log."""
    second = launcher.start(
        script,
        2,
        nodes=2,
        ZOO_OUT=str(launcher.tmp / "resumed.pt"),
        LATTICE_CHECKPOINT_EVERY=NO_CHECKPOINTS,
        **env,
    )
    assert second.wait() == [0, 0], second.output()
    return second.output()


@pytest.mark.parametrize(
    ("script", "batches_per_step", "env"),
    [
        ("train_epochs.py", 1, {}),
        ("train_accum.py", 2, {}),
        ("train_after_step.py", 1, {}),  # BatchNorm: the failed step's forward moved its buffers
        ("train_stream.py", 1, {}),  # a stateful IterableDataset: the dead rank's in its record
        ("train_torchdata.py", 1, {}),  # a StatefulDataLoader: its own state, in the record too
        # lattice.register: the object's state is copied at each boundary (it was not kept)
        ("train_register.py", 1, {}),
        ("train_trainer.py", 1, {}),  # transformers.Trainer (its log: one line per step's end)
        # Lightning: its loop counters are registered, copied at each boundary too
        ("train_lightning.py", 1, {"TORCHELASTIC_RUN_ID": "zoo"}),
        # … an IterableDataset read a batch ahead: the record's stream state is a batch back
        ("train_lightning.py", 1, {"TORCHELASTIC_RUN_ID": "zoo", "ZOO_DATASET": "stream"}),
        ("train_getbatch.py", 1, {}),  # no DataLoader: the boundary is right after the update
        # nanoGPT's loop: the dead rank's next batch, drawn before the update, is in its record
        ("train_getbatch.py", 1, {"ZOO_LOOP": "prefetch"}),
    ],
)
def test_kill_minus_nine_loses_only_the_step_in_flight(
    launcher: Launcher, script: str, batches_per_step: int, env: dict[str, str]
) -> None:
    expected = baseline(launcher, script, 2, **env)
    step, fetched = kill_rank(launcher, script, 2, victim=1, after=9, **env)
    # The victim had taken ``fetched`` batches, so every rank had finished the backward pass of
    # the ones before: the steps they make are finished everywhere, at most the last is lost.
    assert step >= (fetched - 1) // batches_per_step, (step, fetched)
    assert not step_dir(launcher.local_dir(1), step).exists()  # the victim's node: not there
    log = restart(launcher, script, **env)
    assert f"restored step {step}" in log
    tensors = re.search(r"restored the script's tensors: (.*)", log)
    prefetching = env.get("ZOO_LOOP") == "prefetch"  # its next batch is in the record
    assert not prefetching or (tensors and set(tensors.group(1).split(", ")) >= {"x", "y"}), log
    assert bitwise_equal(params(expected), params(launcher.tmp / "resumed.pt"))
    # The RNG states went with the step: a later restore of it needs no live record.
    assert failed_step.kept_records(step_dir(launcher.local_dir(0), step)).keys() == {0, 1}


def test_without_the_dead_ranks_record_the_step_is_not_used(launcher: Launcher) -> None:
    """Its node is gone with its RNG state: restarting from scratch is exact, the step is not."""
    expected = baseline(launcher, "train_epochs.py", 2)
    step, _ = kill_rank(launcher, "train_epochs.py", 2, victim=1, after=9)
    for record in (launcher.local_dir(1) / failed_step.RNG_DIR).iterdir():
        record.write_bytes(b"")  # as if the node were replaced
    log = restart(launcher, "train_epochs.py")
    assert f"step {step} was saved after a failure, but the RNG states of old rank(s) [1]" in log
    assert "restored step" not in log
    assert bitwise_equal(params(expected), params(launcher.tmp / "resumed.pt"))


@pytest.mark.parametrize(
    ("script", "pause", "log"),
    [
        ("train_after_step.py", "ZOO_AFTER_STEP_SLEEP", "steps"),  # after the scheduler's step
        ("train_trainer.py", "ZOO_STEP_SLEEP", "ids"),  # in a callback's on_step_end
    ],
)
def test_sigterm_between_a_step_and_its_boundary_saves_that_step(
    launcher: Launcher, script: str, pause: str, log: str
) -> None:
    """The agent stops the survivors with SIGTERM, most often while they are past a finished
    step and before the next fetch (here: a pause after the step; ``log`` has a line per
    finished step). That step is saved at the boundary the survivor runs on to, with the dead
    rank's record of the step."""
    expected = baseline(launcher, script, 2)
    env = {
        "ZOO_OUT": str(launcher.tmp / "resumed.pt"),
        "LATTICE_CHECKPOINT_EVERY": NO_CHECKPOINTS,
        pause: "0.3",
        "ZOO_STEPS_LOG": str(launcher.tmp / "steps"),
    }
    first = launcher.start(script, 2, nodes=2, **env)

    def steps_of(rank: int) -> int:
        path = launcher.tmp / f"{log}.{rank}"
        return len(path.read_text().splitlines()) if path.exists() else 0

    # Both past step 6: a survivor still before that step's update when SIGTERM comes (on a
    # loaded machine it can lag the victim by that much) rightly saves the step before.
    poll(lambda: steps_of(0) >= 6 and steps_of(1) >= 6, "training progress")
    os.killpg(first.procs[1].pid, signal.SIGKILL)  # in its pause, most likely
    first.procs[0].send_signal(signal.SIGTERM)  # what its agent does when the round fails
    codes = first.wait()
    assert codes == [-signal.SIGTERM, -signal.SIGKILL], first.output()
    finished = steps_of(1)
    saved = re.findall(r"the round failed after step (\d+): saved it", first.output())
    # The survivor finished the victim's last step too (its all-reduce completed); a victim
    # killed inside its next optimizer step leaves the survivor one step further.
    assert len(saved) == 1 and int(saved[0]) in (finished, finished + 1), first.output()
    log = restart(launcher, script)
    if f"restored step {saved[0]}" not in log:  # the victim died inside that step's update
        assert int(saved[0]) == finished + 1 and "are gone with their node" in log, log
    assert bitwise_equal(params(expected), params(launcher.tmp / "resumed.pt"))


def wchan(pid: int) -> str:
    """Where the process's main thread sleeps in the kernel ("0" while it runs)."""
    path = Path(f"/proc/{pid}/wchan")
    return path.read_text() if path.exists() else "0"


def test_sigterm_ends_a_rank_blocked_in_a_collective(launcher: Launcher) -> None:
    """A peer that stops answering without closing its sockets (a node lost, not a process)
    holds the others inside the all-reduce, where a Python signal handler cannot run: the
    addon's watchdog thread still ends them on SIGTERM, as the default action would have."""
    first = launcher.start(
        "train_epochs.py", 2, nodes=2, ZOO_EPOCHS="1000", LATTICE_CHECKPOINT_EVERY=NO_CHECKPOINTS
    )
    poll(lambda: len(id_lines(launcher.tmp, 1)) >= 4, "training progress")
    os.kill(first.procs[1].pid, signal.SIGSTOP)
    seen: list[str] = []

    def stuck() -> bool:  # on a futex in five polls running: not a passing wait
        seen.append(wchan(first.procs[0].pid))
        return len(seen) >= 5 and all(w.startswith("futex") for w in seen[-5:])

    try:
        poll(stuck, "rank 0 blocked in the all-reduce", timeout=60)
    except AssertionError:
        if set(seen) == {"0"}:
            pytest.skip("this kernel does not show where a thread waits (/proc/PID/wchan)")
        raise
    first.procs[0].send_signal(signal.SIGTERM)
    code = first.procs[0].wait(timeout=60)  # gloo itself would wait 30 minutes
    assert code == 128 + signal.SIGTERM, first.output()


def test_a_node_replacing_the_dead_one_on_its_machine_uses_its_record(launcher: Launcher) -> None:
    """A new pod on the dead one's machine starts with a fresh folder; the dead pod's folder,
    beside it, still holds the dead rank's record."""
    expected = baseline(launcher, "train_epochs.py", 2)
    step, _ = kill_rank(launcher, "train_epochs.py", 2, victim=1, after=9)
    dead = launcher.local_dir(1)
    dead.rename(dead.with_name("local-dead-pod"))
    log = restart(launcher, "train_epochs.py")
    assert f"restored step {step}" in log
    assert bitwise_equal(params(expected), params(launcher.tmp / "resumed.pt"))
