"""Restarts over several nodes: each node from its own tier; a node with an empty tier from
its peers (a sharded model's pieces from their replica on the next node), else from the
service."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

import pytest

from lattice.addon import state
from lattice.addon.local_tier import step_dir
from lattice.addon.protocol import CHECKPOINT_AND_EXIT, SAFEPOINT_EXIT
from lattice.checkpoint.client import CheckpointClient
from lattice.checkpoint.errors import RoundSuperseded
from lattice.checkpoint.server import create_app
from lattice.common.auth import job_token
from lattice.common.http import BackgroundService

from .harness import Launcher, assemble, bitwise_equal, id_lines, params, poll
from .test_restore_exact import baseline

ADMIN = "admin-secret-for-addon-tests"


@contextlib.contextmanager
def checkpoint_service(launcher: Launcher, every: str) -> Iterator[tuple[str, str, dict[str, str]]]:
    """A real checkpoint service on loopback: (endpoint, job token, the workers' env)."""
    svc = BackgroundService(lambda: create_app(ADMIN, str(launcher.tmp / "store"), keep=3))
    svc.start()
    try:
        token = job_token(ADMIN, "zoo")
        yield (
            svc.endpoint,
            token,
            {
                "LATTICE_CHECKPOINT_ENDPOINT": svc.endpoint,
                "LATTICE_TOKEN": token,
                "LATTICE_CHECKPOINT_EVERY": every,
                "ZOO_OUT": str(launcher.tmp / "resumed.pt"),
            },
        )
    finally:
        svc.stop()


def test_new_node_restores_from_the_checkpoint_service(launcher: Launcher) -> None:
    expected = baseline(launcher, "train_epochs.py", 2)
    with checkpoint_service(launcher, "2") as (endpoint, token, env):
        first = launcher.start("train_epochs.py", 2, ZOO_STEP_SLEEP="0.1", **env)
        poll(lambda: len(id_lines(launcher.tmp)) >= 7, "training progress")
        (launcher.tmp / "control").write_text(CHECKPOINT_AND_EXIT)
        assert first.wait() == [SAFEPOINT_EXIT] * 2, first.output()
        (launcher.tmp / "control").unlink()
        with CheckpointClient(endpoint, "zoo", token) as client:
            latest = client.latest_good()
        assert latest is not None and latest.step == len(id_lines(launcher.tmp))
        assert latest.meta["round"] == launcher.rounds  # the round that took it orders it
        shutil.rmtree(launcher.tmp / "local")  # a new node: nothing in its local tier
        # The second round commits nothing (its interval is longer than what is left) ...
        second = launcher.start("train_epochs.py", 2, **{**env, "LATTICE_CHECKPOINT_EVERY": "999"})
        assert second.wait() == [0, 0], second.output()
        assert f"restored step {latest.step} from the checkpoint service" in second.output()
        assert bitwise_equal(params(expected), params(launcher.tmp / "resumed.pt"))
        with CheckpointClient(endpoint, "zoo", token) as client:
            assert client.latest_good() == latest
            # ... yet it fenced the job before it restored: the first round, were a node of
            # it still uploading, could no longer commit over what the second restored.
            assert client.current_round() == launcher.rounds == latest.meta["round"] + 1
            late = client.put_shard(latest.step + 1, "state", b"late")
            with pytest.raises(RoundSuperseded):
                client.commit(latest.step + 1, {"state": late}, {"round": latest.meta["round"]})


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


def test_a_lost_node_s_pieces_are_restored_from_their_replica_on_the_next_node(
    launcher: Launcher,
) -> None:
    """fully_shard over 2 nodes without a checkpoint service: node 1 is lost for good (a
    replacement on a fresh machine, its tier empty). Node 0 holds node 1's pieces too (each
    rank sent its file to the next node after writing it), so the newest step is restored,
    not a run from scratch, and the run ends bitwise equal to an uninterrupted one."""
    expected = baseline(launcher, "train_fsdp.py", 2)
    first = launcher.start("train_fsdp.py", 2, nodes=2, ZOO_STEP_SLEEP="0.1", **ENV)
    poll(lambda: len(id_lines(launcher.tmp)) >= 7, "training progress")
    (launcher.tmp / "control").write_text(CHECKPOINT_AND_EXIT)
    assert first.wait() == [SAFEPOINT_EXIT] * 2, first.output()
    (launcher.tmp / "control").unlink()
    step = len(id_lines(launcher.tmp))
    assert (step_dir(launcher.local_dir(0), step) / "shard-1-of-2.pt").is_file()
    shutil.rmtree(launcher.local_dir(1))
    second = launcher.start("train_fsdp.py", 2, nodes=2, ZOO_OUT=str(launcher.tmp / "r.pt"), **ENV)
    assert second.wait() == [0, 0], second.output()
    assert f"restored step {step} from " in second.output()
    assert "incomplete" not in second.output()
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


def test_sharded_model_restores_from_the_service_at_another_size(launcher: Launcher) -> None:
    """fully_shard on 2 nodes with the service: every rank uploads its own pieces and rank 0
    commits a step once all are there (periodically, and at a safe point). With every node's
    tier gone, 3 ranks cut the service's pieces again; then 2 ranks resume and end bitwise
    equal to an uninterrupted run."""
    expected = baseline(launcher, "train_fsdp.py", 2)
    with checkpoint_service(launcher, "1") as (endpoint, token, env):
        first = launcher.start("train_fsdp.py", 2, nodes=2, ZOO_STEP_SLEEP="0.1", **env)
        client = CheckpointClient(endpoint, "zoo", token)
        # Past epoch 0 (6 steps per epoch): a one-epoch run then trains nothing (below).
        poll(lambda: (getattr(client.latest_good(), "step", 0) or 0) >= 6, "periodic commits")
        first.kill()
        latest = client.latest_good()
        assert latest is not None
        assert {"state", "rng", "shard-0-of-2", "shard-1-of-2"} == set(latest.shards)
        pieces = [state.loads(client.get_shard(latest.step, f"shard-{r}-of-2")) for r in (0, 1)]
        saved = assemble(state.loads(client.get_shard(latest.step, "state")), pieces)
        for node in range(3):
            shutil.rmtree(launcher.local_dir(node), ignore_errors=True)
        # The script's one-epoch loop ends before the checkpoint's epoch: it saves what was
        # restored.
        peek = launcher.start("train_fsdp.py", 3, nodes=3, ZOO_EPOCHS="1", **env)
        assert peek.wait() == [0, 0, 0], peek.output()
        assert f"restored step {latest.step} from the checkpoint service" in peek.output()
        assert bitwise_equal(saved, params(launcher.tmp / "resumed.pt"))
        (launcher.tmp / "resumed.pt").unlink()
        for node in range(3):
            shutil.rmtree(launcher.local_dir(node), ignore_errors=True)
        before = len(id_lines(launcher.tmp))
        second = launcher.start("train_fsdp.py", 2, nodes=2, ZOO_STEP_SLEEP="0.1", **env)
        poll(lambda: len(id_lines(launcher.tmp)) >= before + 3, "training progress")
        (launcher.tmp / "control").write_text(CHECKPOINT_AND_EXIT)
        assert second.wait() == [SAFEPOINT_EXIT] * 2, second.output()
        (launcher.tmp / "control").unlink()
        stopped = client.latest_good()
        assert stopped is not None
        assert f"safe point at step {stopped.step}:" in second.output()  # committed at once
        for node in range(2):
            shutil.rmtree(launcher.local_dir(node), ignore_errors=True)
        third = launcher.start("train_fsdp.py", 2, nodes=2, **env)
        assert third.wait() == [0, 0], third.output()
        assert f"restored step {stopped.step} from the checkpoint service" in third.output()
        assert bitwise_equal(params(expected), params(launcher.tmp / "resumed.pt"))
        client.close()


def test_a_corrupt_piece_on_the_service_falls_back_to_the_previous_commit(
    launcher: Launcher,
) -> None:
    """fully_shard on 2 nodes: a flipped byte in rank 1's pieces of the service's newest
    checkpoint. With every node's tier gone, no rank restores that step (all agree); the
    previous commit is restored and the run ends bitwise equal to an uninterrupted one."""
    expected = baseline(launcher, "train_fsdp.py", 2)
    with checkpoint_service(launcher, "1") as (endpoint, token, env):
        first = launcher.start("train_fsdp.py", 2, nodes=2, ZOO_STEP_SLEEP="0.1", **env)
        poll(lambda: len(id_lines(launcher.tmp)) >= 8, "training progress")
        (launcher.tmp / "control").write_text(CHECKPOINT_AND_EXIT)
        assert first.wait() == [SAFEPOINT_EXIT] * 2, first.output()
        (launcher.tmp / "control").unlink()
        with CheckpointClient(endpoint, "zoo", token) as client:
            newest, previous = (m.step for m in client.list()[:2])
        (victim,) = (launcher.tmp / "store" / "zoo" / f"{newest:012d}" / "shards").glob(
            "shard-1-of-2.*"
        )
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        victim.write_bytes(bytes(raw))
        for node in range(2):
            shutil.rmtree(launcher.local_dir(node))
        second = launcher.start("train_fsdp.py", 2, nodes=2, **env)
        assert second.wait() == [0, 0], second.output()
        log = second.output()
        assert f"checkpoint of step {newest} on the service unusable" in log
        assert f"restored step {previous} from the checkpoint service" in log
        assert bitwise_equal(params(expected), params(launcher.tmp / "resumed.pt"))
