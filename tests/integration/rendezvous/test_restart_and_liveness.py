"""Soft state and liveness: service restarts, lost nodes, generations that are never reused."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

from rdzv_testing import bounded, join, until

NEVER = 600.0


async def test_restart_mid_round_does_not_end_it_and_clients_reregister(
    service_factory, clients, admin
) -> None:
    svc = service_factory(settle_s=NEVER, lease_s=2.0)
    a, b = clients(svc, "a"), clients(svc, "b")
    r = (await bounded(asyncio.gather(join(a, max_nodes=2), join(b, max_nodes=2))))[0]
    ends = [asyncio.ensure_future(c.wait_round_end(r.generation)) for c in (a, b)]
    svc.restart()  # same port, empty state
    adm = admin(svc)

    async def readopted():
        status = await adm.job_status("job")
        return status["running"] and status

    status = await until(readopted, "the round to be re-registered")
    assert status["generation"] == r.generation
    # the same members with the same ranks (a and b joined concurrently: either may be rank 0)
    assert [m["node_id"] for m in status["members"]] == [m.node_id for m in r.members]
    assert sorted(m.node_id for m in r.members) == ["a", "b"]
    # both clients keep heart-beating into the new instance: the round outlives 1.5 leases
    loop = asyncio.get_running_loop()
    quiet_until = loop.time() + 3.0

    async def stayed_running() -> bool:
        status = await adm.job_status("job")
        assert status["running"], f"round ended after the restart: {status['last_end']}"
        return loop.time() > quiet_until

    await until(stayed_running, "1.5 leases after the restart")
    assert not any(e.done() for e in ends)
    await b.report_failure(r.generation, "after restart")
    for end in await bounded(asyncio.gather(*ends)):
        assert end.reason == "failure" and end.detail == "b: after restart"
    # the next round's generation is above the re-asserted one
    r2 = await bounded(asyncio.gather(join(a, max_nodes=2), join(b, max_nodes=2)))
    assert r2[0].generation > r.generation


async def test_standby_does_not_steal_the_round_across_a_restart(
    service_factory, clients, admin
) -> None:
    svc = service_factory(settle_s=0.0, lease_s=2.0)
    a, b, c = clients(svc, "a"), clients(svc, "b"), clients(svc, "c")
    both = (join(x, min_nodes=2, max_nodes=2) for x in (a, b))
    r = (await bounded(asyncio.gather(*both)))[0]
    assert len(r.members) == 2
    standby = asyncio.ensure_future(join(c, min_nodes=1, max_nodes=2))  # the job's min is now 1
    adm = admin(svc)

    async def c_waits():
        return [w["node_id"] for w in (await adm.job_status("job"))["waiting"]] == ["c"]

    await until(c_waits, "c to stand by")
    ends = [asyncio.ensure_future(x.wait_round_end(r.generation)) for x in (a, b)]
    svc.restart()  # c re-joins at once; settle is 0 and min is 1, yet the round must survive

    async def readopted():
        status = await adm.job_status("job")
        return status["running"] and status

    status = await until(readopted, "the round to be re-registered")
    assert status["generation"] == r.generation
    assert [w["node_id"] for w in status["waiting"]] == ["c"]
    assert not standby.done() and not any(e.done() for e in ends)
    standby.cancel()


async def test_generation_never_reused_after_restart_even_for_fresh_agents(
    service_factory, clients
) -> None:
    svc = service_factory(settle_s=NEVER)
    first = await bounded(join(clients(svc, "a"), max_nodes=1))
    svc.restart()
    fresh = await bounded(join(clients(svc, "z"), max_nodes=1))  # knows no earlier generation
    assert fresh.generation > first.generation


async def test_leave_ends_round_for_everyone(service_factory, clients) -> None:
    svc = service_factory(settle_s=NEVER)
    cs = [clients(svc, f"n{i}") for i in range(3)]
    r = (await bounded(asyncio.gather(*(join(c, max_nodes=3) for c in cs))))[0]
    waits = [asyncio.ensure_future(c.wait_round_end(r.generation)) for c in cs[1:]]
    await cs[0].leave()
    for end in await bounded(asyncio.gather(*waits)):
        assert (end.reason, end.graceful) == ("left", False) and "n0" in end.detail


_DEAD_AGENT = textwrap.dedent(
    """
    import asyncio, sys
    from lattice.rendezvous.client import RendezvousClient

    async def main():
        c = RendezvousClient(sys.argv[1], "job", "doomed", sys.argv[2])
        r = await c.join(nproc=1, addr="127.0.0.1", port=1, min_nodes=int(sys.argv[3]),
                         max_nodes=2)
        print(r.generation, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def _agent(svc, min_nodes: int) -> subprocess.Popen[bytes]:
    """A real agent-like process (its own session, so the test can SIGKILL it cleanly)."""
    return subprocess.Popen(
        [sys.executable, "-c", _DEAD_AGENT, svc.endpoint, svc.token, str(min_nodes)],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


async def test_killed_agent_loses_its_lease_and_ends_the_round(service_factory, clients) -> None:
    svc = service_factory(settle_s=NEVER, lease_s=2.0)
    proc = _agent(svc, min_nodes=2)
    try:
        survivor = clients(svc, "survivor")
        r = await bounded(join(survivor, max_nodes=2))
        assert {m.node_id for m in r.members} == {"survivor", "doomed"}
        line = await bounded(asyncio.to_thread(proc.stdout.readline))
        assert int(line) == r.generation
        end_task = asyncio.ensure_future(survivor.wait_round_end(r.generation))
        os.killpg(proc.pid, signal.SIGKILL)
        end = await bounded(end_task)
        assert end.reason == "node_lost" and "doomed" in end.detail
    finally:
        _reap(proc)


async def test_killed_waiting_agent_is_dropped(service_factory, admin) -> None:
    svc = service_factory(settle_s=NEVER, lease_s=0.5)
    proc = _agent(svc, min_nodes=2)
    try:
        adm = admin(svc)
        await until(lambda: _waiting_ids(adm, ["doomed"]), "the agent to wait")
        os.killpg(proc.pid, signal.SIGKILL)
        await until(lambda: _waiting_ids(adm, []), "the dead agent to be dropped")
    finally:
        _reap(proc)


async def test_cancelled_join_withdraws(service_factory, clients, admin) -> None:
    svc = service_factory(settle_s=NEVER)
    quitter = clients(svc, "quitter")
    task = asyncio.ensure_future(join(quitter, min_nodes=2))
    adm = admin(svc)
    await until(lambda: _waiting_ids(adm, ["quitter"]), "quitter to wait")
    task.cancel()
    await until(lambda: _waiting_ids(adm, []), "quitter to be withdrawn")


async def _waiting_ids(adm, ids: list[str]) -> bool:
    status = await adm.job_status("job")
    return [w["node_id"] for w in status["waiting"]] == ids
