"""Restarts over several nodes: each node from its own tier; a node with an empty tier from
its peers, else from the service."""

from __future__ import annotations

import shutil

from lattice.addon.local_tier import step_dir
from lattice.addon.protocol import CHECKPOINT_AND_EXIT, SAFEPOINT_EXIT
from lattice.checkpoint.client import CheckpointClient
from lattice.checkpoint.server import create_app
from lattice.common.auth import job_token
from lattice.common.http import BackgroundService

from .harness import Launcher, bitwise_equal, id_lines, params, poll
from .test_restore_exact import baseline

ADMIN = "admin-secret-for-addon-tests"


def test_new_node_restores_from_the_checkpoint_service(launcher: Launcher) -> None:
    expected = baseline(launcher, "train_epochs.py", 2)
    svc = BackgroundService(lambda: create_app(ADMIN, str(launcher.tmp / "store"), keep=3))
    svc.start()
    try:
        token = job_token(ADMIN, "zoo")
        env = {
            "LATTICE_CHECKPOINT_ENDPOINT": svc.endpoint,
            "LATTICE_TOKEN": token,
            "LATTICE_CHECKPOINT_EVERY": "2",
            "ZOO_OUT": str(launcher.tmp / "resumed.pt"),
        }
        first = launcher.start("train_epochs.py", 2, ZOO_STEP_SLEEP="0.1", **env)
        poll(lambda: len(id_lines(launcher.tmp)) >= 7, "training progress")
        (launcher.tmp / "control").write_text(CHECKPOINT_AND_EXIT)
        assert first.wait() == [SAFEPOINT_EXIT] * 2, first.output()
        (launcher.tmp / "control").unlink()
        with CheckpointClient(svc.endpoint, "zoo", token) as client:
            latest = client.latest_good()
        assert latest is not None and latest.step == len(id_lines(launcher.tmp))
        assert latest.meta["round"] == launcher.rounds  # the round that took it orders it
        shutil.rmtree(launcher.tmp / "local")  # a new node: nothing in its local tier
        second = launcher.start("train_epochs.py", 2, **env)
        assert second.wait() == [0, 0], second.output()
        assert f"restored step {latest.step} from the checkpoint service" in second.output()
        assert bitwise_equal(params(expected), params(launcher.tmp / "resumed.pt"))
    finally:
        svc.stop()


ENV = {"LATTICE_CHECKPOINT_EVERY": "2"}


def two_nodes_to_a_safe_point(launcher: Launcher) -> int:
    """Two nodes train, then stop at a safe point; the step they stopped at."""
    first = launcher.start("train_epochs.py", 2, nodes=2, ZOO_STEP_SLEEP="0.1", **ENV)
    poll(lambda: len(id_lines(launcher.tmp)) >= 7, "training progress")
    (launcher.tmp / "control").write_text(CHECKPOINT_AND_EXIT)
    assert first.wait() == [SAFEPOINT_EXIT] * 2, first.output()
    (launcher.tmp / "control").unlink()
    return len(id_lines(launcher.tmp))


def test_new_node_gets_the_newest_step_from_a_peer(launcher: Launcher) -> None:
    """No checkpoint service: node 1 is replaced (its local tier is empty), node 0 has the step;
    the new node receives it over the process group and the run ends bitwise equal."""
    expected = baseline(launcher, "train_epochs.py", 2)
    step = two_nodes_to_a_safe_point(launcher)
    assert step_dir(launcher.local_dir(1), step).is_dir()
    shutil.rmtree(launcher.local_dir(1))  # a new node: nothing in its local tier
    second = launcher.start(
        "train_epochs.py", 2, nodes=2, ZOO_OUT=str(launcher.tmp / "r.pt"), **ENV
    )
    assert second.wait() == [0, 0], second.output()
    assert f"node-local checkpoint of step {step} received from rank 0" in second.output()
    assert f"restored step {step} from " in second.output()
    assert bitwise_equal(params(expected), params(launcher.tmp / "r.pt"))


def test_every_node_restores_from_its_own_tier(launcher: Launcher) -> None:
    """Two nodes wrote the same steps (each its own file): they agree on the newest and each
    reads its own copy; nothing crosses the network and no step is refused."""
    expected = baseline(launcher, "train_epochs.py", 2)
    step = two_nodes_to_a_safe_point(launcher)
    second = launcher.start(
        "train_epochs.py", 2, nodes=2, ZOO_OUT=str(launcher.tmp / "r.pt"), **ENV
    )
    assert second.wait() == [0, 0], second.output()
    for node in (0, 1):
        assert f"restored step {step} from {step_dir(launcher.local_dir(node), step)}" in (
            second.output()
        )
    assert "differ between nodes" not in second.output()
    assert "received from" not in second.output()
    assert bitwise_equal(params(expected), params(launcher.tmp / "r.pt"))
