"""Auth, job scoping, input validation and the KV, over real HTTP."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from rdzv_testing import bounded, join, until

from lattice.common.auth import job_token
from lattice.rendezvous.errors import RendezvousAuthError, RendezvousError

JOIN = {
    "node_id": "n0",
    "join_id": "j1",
    "nproc": 1,
    "addr": "127.0.0.1",
    "port": 1234,
    "min_nodes": 1,
    "max_nodes": 2,
}


async def test_wrong_token_is_401_and_changes_nothing(service_factory, clients, admin) -> None:
    svc = service_factory(settle_s=0.0)
    intruder = clients(svc, "n0", token="not-the-token")
    with pytest.raises(RendezvousAuthError, match=r"401.*LATTICE_TOKEN"):
        await bounded(join(intruder))
    with pytest.raises(RendezvousAuthError):
        await intruder.kv_set("k", b"v")
    status = await admin(svc).job_status("job")
    assert status["generation"] is None and status["waiting"] == []
    r = httpx.post(f"{svc.url}/v1/jobs/job/join", json=JOIN)
    assert r.status_code == 401 and "error" in r.json()


async def test_job_token_opens_only_its_job(service_factory, clients) -> None:
    svc = service_factory(settle_s=0.0)
    token_a = job_token(svc.token, "job-a")
    own = clients(svc, "n0", job="job-a", token=token_a)
    r = await bounded(join(own))
    assert r.job == "job-a"
    other = clients(svc, "n0", job="job-b", token=token_a)
    with pytest.raises(RendezvousAuthError, match="403"):
        await bounded(join(other))
    headers = {"Authorization": f"Bearer {token_a}"}
    target = httpx.put(f"{svc.url}/v1/jobs/job-a/target", json={"size": 2}, headers=headers)
    assert target.status_code == 403 and "admin" in target.json()["error"]


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"{not json", 400, "invalid JSON"),
        ({**JOIN, "nproc": "2"}, 400, "nproc"),
        ({**JOIN, "nproc": 0}, 400, "nproc"),
        ({**JOIN, "port": 70000}, 400, "port"),
        ({**JOIN, "node_id": "bad id!"}, 400, "node_id"),
        ({**JOIN, "min_nodes": 3, "max_nodes": 2}, 400, "min_nodes (3) is larger"),
        ({**JOIN, "surprise": 1}, 400, "surprise"),
        ({k: v for k, v in JOIN.items() if k != "addr"}, 400, "addr"),
        ([1, 2], 400, "invalid"),
        (b"x" * (2 * 1024 * 1024), 413, ""),
    ],
)
async def test_malformed_join_is_4xx_and_service_stays_up(
    service_factory, admin, body, status, says
) -> None:
    svc = service_factory(settle_s=0.0)
    headers = {"Authorization": f"Bearer {svc.token}"}
    url = f"{svc.url}/v1/jobs/job/join"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers=headers)
    else:
        r = httpx.post(url, json=body, headers=headers)
    assert r.status_code == status
    assert says in r.json()["error"]
    assert (await admin(svc).job_status("job"))["waiting"] == []
    assert httpx.get(f"{svc.url}/healthz").json()["status"] == "ok"
    good = httpx.post(url, json=JOIN, headers=headers)  # still serves well-formed requests
    assert good.status_code == 200 and good.json()["status"] == "ready"


async def test_malformed_paths_and_queries(service_factory) -> None:
    svc = service_factory()
    h = {"Authorization": f"Bearer {svc.token}"}
    base = f"{svc.url}/v1/jobs/job"
    assert httpx.get(f"{base}/rounds/abc/end", headers=h).status_code == 400
    assert httpx.get(f"{base}/rounds/1/end?wait_s=nan", headers=h).status_code == 400
    assert httpx.get(f"{base}/rounds/1/end?wait_s=9999", headers=h).status_code == 400
    assert httpx.get(f"{base}/rounds/1/end?node_id=a%20b", headers=h).status_code == 400
    assert httpx.get(f"{svc.url}/v1/jobs/UPPER/kv/x", headers=h).status_code == 400
    assert httpx.put(f"{base}/kv/a%20b", content=b"v", headers=h).status_code == 400
    assert httpx.put(f"{base}/target", json={"size": -1}, headers=h).status_code == 400
    bad_register = {
        "node_id": "a",
        "generation": 5,
        "min_nodes": 1,
        "max_nodes": 2,
        "members": [{"node_id": "b", "rank": 1, "nproc": 1, "addr": "h", "port": 1}],
    }
    r = httpx.post(f"{base}/register", json=bad_register, headers=h)
    assert r.status_code == 400 and "ranks" in r.json()["error"]
    assert httpx.get(f"{svc.url}/healthz").status_code == 200


async def test_kv_set_get_wait_and_limits(service_factory, clients) -> None:
    svc = service_factory()
    a, b = clients(svc, "a"), clients(svc, "b")
    assert await a.kv_get("missing") is None
    waiter = asyncio.ensure_future(b.kv_get("lattice.agent/failures", wait_s=60))
    await until(lambda: _parked(svc), "the KV get to park")
    assert not waiter.done()
    await a.kv_set("lattice.agent/failures", '{"count": 1}')
    assert await bounded(waiter) == b'{"count": 1}'
    await a.kv_set("blob", bytes(range(256)) * 256)  # 64 KiB exactly is allowed
    assert await b.kv_get("blob") == bytes(range(256)) * 256
    with pytest.raises(RendezvousError, match="413"):
        await a.kv_set("blob", b"x" * (64 * 1024 + 1))
    other_job = clients(svc, "a", job="other")
    assert await other_job.kv_get("blob") is None  # jobs do not share keys
    for i in range(1022):
        await a.kv_set(f"k{i}", b"")
    with pytest.raises(RendezvousError, match="1024 keys"):
        await a.kv_set("one-too-many", b"")
    await a.kv_set("k0", b"overwrite is fine")


async def _parked(svc) -> bool:
    text = httpx.get(f"{svc.url}/metrics").text
    return "lattice_rendezvous_jobs 1.0" in text  # the waiting get created the job


async def test_metrics_count_jobs_members_and_rounds(service_factory, clients) -> None:
    svc = service_factory(settle_s=0.0)
    cs = [clients(svc, f"n{i}", job=f"j{i % 2}") for i in range(4)]
    await bounded(asyncio.gather(*(join(c, min_nodes=2, max_nodes=2) for c in cs)))
    text = httpx.get(f"{svc.url}/metrics").text
    assert "lattice_rendezvous_jobs 2.0" in text
    assert "lattice_rendezvous_members 4.0" in text
    assert 'lattice_rendezvous_rounds_closed_total{trigger="max"} 2.0' in text
    assert "lattice_rendezvous_round_close_seconds_count 2.0" in text
