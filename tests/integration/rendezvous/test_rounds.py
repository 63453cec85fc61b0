"""How rounds close and end, with a real service on loopback and real clients."""

from __future__ import annotations

import asyncio

from rdzv_testing import bounded, join, metric, until

from lattice.rendezvous.client import RoundEnd

NEVER = 600.0  # a settle window no test waits out: a round closing proves another rule fired


async def test_round_closes_at_max_without_settle_and_extra_node_stands_by(
    service_factory, clients, admin
) -> None:
    svc = service_factory(settle_s=NEVER)
    a, b, c = (clients(svc, f"n{i}") for i in range(3))
    adm = admin(svc)
    first = asyncio.ensure_future(join(a, max_nodes=2))
    await until(lambda: _waiting(adm, 1), "n0 to wait")  # ranks follow arrival: fix it
    r1, r2 = await bounded(asyncio.gather(first, join(b, max_nodes=2)))
    assert r1 == r2 and [m.node_id for m in r1.members] == ["n0", "n1"]
    standby = asyncio.ensure_future(join(c, max_nodes=2))

    async def c_waiting():
        status = await adm.job_status("job")
        return [w["node_id"] for w in status["waiting"]] == ["n2"] and status

    status = await until(c_waiting, "n2 to wait as standby")
    assert status["running"] and status["generation"] == r1.generation  # no resize at max
    assert not standby.done()
    await a.report_failure(r1.generation, "boom")  # next round takes the standby in
    assert (await bounded(b.wait_round_end(r1.generation))).reason == "failure"
    r3 = await bounded(join(b, max_nodes=2))
    assert (await bounded(standby)) == r3
    assert [m.node_id for m in r3.members] == ["n1", "n2"]
    standby.cancel()


async def test_settle_window_closes_below_max(service_factory, clients) -> None:
    svc = service_factory(settle_s=0.3)
    a, b = clients(svc, "a"), clients(svc, "b")
    both = (join(c, min_nodes=2, max_nodes=4) for c in (a, b))
    ra, rb = await bounded(asyncio.gather(*both))
    assert ra == rb and len(ra.members) == 2
    assert metric(svc, "lattice_rendezvous_rounds_closed_total", 'trigger="settle"') == 1


async def test_min_nodes_holds_the_round(service_factory, clients, admin) -> None:
    svc = service_factory(settle_s=0.0)
    a, b = clients(svc, "a"), clients(svc, "b")
    first = asyncio.ensure_future(join(a, min_nodes=2))
    adm = admin(svc)
    await until(lambda: _waiting(adm, 1), "a to wait")
    assert not first.done()  # settle is 0: only min holds it back
    rb = await bounded(join(b, min_nodes=2))
    assert (await bounded(first)) == rb and rb.world_size == 2


async def _waiting(adm, n: int, job: str = "job") -> bool:
    return len((await adm.job_status(job))["waiting"]) == n


async def test_target_size_closes_without_settle(service_factory, clients, admin) -> None:
    svc = service_factory(settle_s=NEVER)
    adm = admin(svc)
    await adm.set_target("job", 2)
    a, b, c = (clients(svc, f"n{i}") for i in range(3))
    ra, rb = await bounded(asyncio.gather(join(a), join(b)))
    assert ra == rb and len(ra.members) == 2
    assert metric(svc, "lattice_rendezvous_rounds_closed_total", 'trigger="target"') == 1
    # raising the target with a node waiting resizes gracefully
    pending = asyncio.ensure_future(join(c))
    await until(lambda: _waiting(adm, 1), "n2 to wait")
    ends = asyncio.gather(a.wait_round_end(ra.generation), b.wait_round_end(ra.generation))
    await adm.set_target("job", 3)
    for end in await bounded(ends):
        assert end.reason == "resize" and end.graceful
    r2 = await bounded(asyncio.gather(join(a), join(b), pending))
    assert r2[0] == r2[1] == r2[2] and len(r2[0].members) == 3


async def test_failure_ends_round_for_all_and_reforms_without_settle(
    service_factory, clients
) -> None:
    svc = service_factory(settle_s=NEVER)
    cs = [clients(svc, f"n{i}") for i in range(3)]
    first = await bounded(asyncio.gather(*(join(c, max_nodes=3, nproc=2) for c in cs)))
    gen = first[0].generation
    waits = [asyncio.ensure_future(c.wait_round_end(gen)) for c in cs]
    await cs[1].report_failure(gen, "worker 3 exited with code 1")
    ends = await bounded(asyncio.gather(*waits))
    assert ends == [RoundEnd(gen, "failure", "n1: worker 3 exited with code 1", False)] * 3
    # max is 4, settle never passes: only "every live member re-joined" can close this round
    second = await bounded(asyncio.gather(*(join(c, max_nodes=4, nproc=2) for c in cs)))
    assert second[0] == second[1] == second[2] and second[0].generation > gen
    assert metric(svc, "lattice_rendezvous_rounds_closed_total", 'trigger="rejoin"') == 1


async def test_ranks_stay_stable_new_nodes_append_and_compact(service_factory, clients) -> None:
    svc = service_factory(settle_s=NEVER)
    n0, n1, n2, n3 = (clients(svc, f"n{i}") for i in range(4))
    r = await bounded(asyncio.gather(*(join(c, max_nodes=3) for c in (n0, n1, n2))))
    order = [m.node_id for m in r[0].members]
    await n0.report_failure(r[0].generation, "x")
    # re-join in reverse order: ranks keep the previous order
    back = [asyncio.ensure_future(join(c, max_nodes=4)) for c in (n2, n1, n0)]
    r2 = (await bounded(asyncio.gather(*back)))[0]
    assert [m.node_id for m in r2.members] == order
    ends = [asyncio.ensure_future(c.wait_round_end(r2.generation)) for c in (n0, n1, n2)]
    newcomer = asyncio.ensure_future(join(n3, max_nodes=4))
    for end in await bounded(asyncio.gather(*ends)):
        assert end.reason == "resize" and end.graceful and "n3" in end.detail
    r3 = (await bounded(asyncio.gather(*(join(c, max_nodes=4) for c in (n1, n0, n2)), newcomer)))[0]
    assert [m.node_id for m in r3.members] == [*order, "n3"]
    assert [m.rank for m in r3.members] == [0, 1, 2, 3]
    await n1.leave()
    for c in (n0, n2, n3):
        end = await bounded(c.wait_round_end(r3.generation))
        assert end.reason == "left" and not end.graceful
    r4 = (await bounded(asyncio.gather(*(join(c, max_nodes=4) for c in (n3, n2, n0)))))[0]
    # the first round's order is the order the joins arrived in; n1's leaving closes the gap
    kept = [n for n in order if n != "n1"] + ["n3"]
    assert [(m.node_id, m.rank) for m in r4.members] == [(n, i) for i, n in enumerate(kept)]
    assert r4.rank_offset("n3") == 2 and r4.master_addr == "127.0.0.1"


async def test_succeeded_member_does_not_end_round(service_factory, clients, admin) -> None:
    svc = service_factory(settle_s=NEVER)
    a, b = clients(svc, "a"), clients(svc, "b")
    r = (await bounded(asyncio.gather(join(a, max_nodes=2), join(b, max_nodes=2))))[0]
    waiting = asyncio.ensure_future(b.wait_round_end(r.generation))
    await a.report_succeeded(r.generation)
    status = await admin(svc).job_status("job")
    assert status["running"] and status["succeeded"] == ["a"] and not waiting.done()
    await a.close()  # a succeeded agent stops heart-beating: that must not end the round either
    await b.report_failure(r.generation, "late failure")
    end = await bounded(waiting)
    assert end.reason == "failure" and end.detail == "b: late failure"


async def test_join_while_running_below_max_is_a_graceful_resize(service_factory, clients) -> None:
    svc = service_factory(settle_s=NEVER)
    a, b = clients(svc, "a"), clients(svc, "b")
    r = await bounded(join(a, max_nodes=1))  # max 1 closes at once
    end_task = asyncio.ensure_future(a.wait_round_end(r.generation))
    pending = asyncio.ensure_future(join(b, max_nodes=2))  # b's max (2) applies to the job now
    end = await bounded(end_task)
    assert (end.reason, end.graceful) == ("resize", True)
    r2 = await bounded(join(a, max_nodes=2))
    assert await bounded(pending) == r2 and [m.node_id for m in r2.members] == ["a", "b"]


async def test_generations_strictly_increase(service_factory, clients) -> None:
    svc = service_factory(settle_s=NEVER)
    a = clients(svc, "a")
    seen = []
    for _ in range(4):
        r = await bounded(join(a, max_nodes=1))
        seen.append(r.generation)
        await a.report_failure(r.generation, "again")
        await bounded(a.wait_round_end(r.generation))
    assert seen == sorted(set(seen))
