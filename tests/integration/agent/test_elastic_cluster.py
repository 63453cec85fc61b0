"""Agents against a real rendezvous service, training real DDP (gloo on loopback).

One cluster for the module (starting torch processes is the expensive part); the tests run in
order and each starts from the state the previous one left: two agents train, a worker dies, the
service restarts, a third agent joins, it is killed -9, and one agent is stopped with SIGTERM.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _agent_cluster import Cluster, alive, descendants, wait_until


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(Path(tmp_path_factory.mktemp("cluster")))
    try:
        c.service.start()
        c.add_agent("node-a")
        c.add_agent("node-b")
        yield c
    finally:
        c.teardown()


def test_two_agents_train_with_rank_prefixed_output(cluster: Cluster) -> None:
    steps = cluster.wait_training(world=2)
    assert {s.rank for s in steps} == {0, 1}
    assert all(s.prefix_rank == s.rank for s in cluster.steps()), "prefix must be the global rank"
    assert {s.node for s in steps if s.rank == 0} != {s.node for s in steps if s.rank == 1}


def test_killed_worker_reforms_the_round_and_training_continues(cluster: Cluster) -> None:
    before = cluster.wait_training(world=2)
    old_round = before[-1].round
    victim = max((s for s in before if s.node == "node-b"), key=lambda s: s.t)
    fault = time.time()
    os.kill(victim.pid, signal.SIGKILL)
    after = cluster.wait_training(world=2, after=fault, timeout=90)
    assert after[-1].round > old_round, cluster.dump()
    assert all(s.restart >= 1 for s in after), "a failed round counts as a restart"
    assert victim.pid not in {s.pid for s in after}
    # The failure is named where it happened, and the other agent got the round's end pushed.
    assert "was killed by SIGKILL" in cluster.agents["node-b"].text(), cluster.dump()
    assert f"round {old_round} failed" in cluster.agents["node-a"].text(), cluster.dump()


def test_service_restart_does_not_disturb_training(cluster: Cluster) -> None:
    running = cluster.wait_training(world=2)
    round_before, pids = running[-1].round, {s.pid for s in running}
    restart = time.time()
    cluster.service.kill()
    cluster.service.start()
    # Long enough for heartbeats and round-end polls to hit the new instance and re-register.
    wait_until(
        lambda: any(s.t > restart + 8 for s in cluster.steps()), 90, "steps 8 s after restart"
    )
    later = [s for s in cluster.steps() if s.t > restart]
    assert {s.round for s in later} == {round_before}, cluster.dump()
    assert {s.pid for s in later} == pids, "the same processes keep training"


def test_new_agent_grows_the_world(cluster: Cluster) -> None:
    running = cluster.wait_training(world=2)
    joined = time.time()
    cluster.add_agent("node-c")
    grown = cluster.wait_training(world=3, after=joined, timeout=120)
    assert {s.rank for s in grown} == {0, 1, 2}
    assert grown[-1].round > running[-1].round
    # A resize is not a failure: the restart count did not move.
    assert {s.restart for s in grown} == {running[-1].restart}, cluster.dump()


def test_agent_killed_9_leaves_no_orphans_and_the_rest_continue(cluster: Cluster) -> None:
    cluster.wait_training(world=3)
    agent = cluster.agents["node-c"]
    tree = descendants(agent.proc.pid)
    workers = {s.pid for s in agent.steps()}
    assert workers & set(tree), "the worker runs under its agent"
    fault = time.time()
    os.kill(agent.proc.pid, signal.SIGKILL)
    agent.proc.wait(30)
    wait_until(lambda: not any(alive(p) for p in tree), 30, "node-c's processes to die")
    shrunk = cluster.wait_training(world=2, after=fault, timeout=120)
    assert {s.node for s in shrunk} == {"node-a", "node-b"}, cluster.dump()


def test_sigterm_stops_an_agent_cleanly_and_the_other_goes_on(cluster: Cluster) -> None:
    cluster.wait_training(world=2)
    agent = cluster.agents["node-b"]
    tree = descendants(agent.proc.pid)
    stop = time.time()
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(60) == 128 + signal.SIGTERM
    assert not any(alive(p) for p in tree), "workers and standbys stop with the agent"
    alone = cluster.wait_training(world=1, after=stop, timeout=120)
    assert {s.node for s in alone} == {"node-a"}
    own_lines = [ln for ln in agent.text().splitlines() if not ln.startswith("[rank")]
    assert not [ln for ln in own_lines if "Traceback" in ln], "the agent itself never crashes"
    assert "received SIGTERM" in agent.text()
