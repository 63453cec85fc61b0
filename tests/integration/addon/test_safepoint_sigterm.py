"""A SIGTERM that arrives while a worker is writing its safe point does not cut it short.

When a node leaves after a safe point, the round ends for the other nodes too and their agents
SIGTERM their workers at once — while those workers may still be writing the same safe point
(seen in the chaos soak: rank 0 died mid-upload and the group restored the step before).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from lattice.addon.protocol import CHECKPOINT_AND_EXIT, SAFEPOINT_EXIT

from .harness import Launcher, poll

HELPER = Path(__file__).with_name("_slow_safepoint.py")


def test_sigterm_during_the_safe_point_waits_for_the_checkpoint(launcher: Launcher) -> None:
    ready, go = launcher.tmp / "ready", launcher.tmp / "go"
    (launcher.tmp / "control").write_text(CHECKPOINT_AND_EXIT)
    run = launcher.start(
        str(HELPER), 1, LATTICE_CHECKPOINT_EVERY="1", SLOW_READY=str(ready), SLOW_GO=str(go)
    )
    poll(ready.exists, "the safe point's state file write")
    (proc,) = run.procs
    os.kill(proc.pid, signal.SIGTERM)  # the agent's stop, while the state is being written
    go.touch()
    assert run.wait() == [SAFEPOINT_EXIT], run.output()
    assert "safe point at step 1: checkpointed" in run.output()
    (step,) = (launcher.tmp / "local").glob("step-*")
    assert (step / "state.pt.sha256").exists()
