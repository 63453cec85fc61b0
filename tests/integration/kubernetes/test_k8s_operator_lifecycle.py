"""Status writes that race, deletion through the finalizer, watches that break, and leader
election between two operator replicas."""

from __future__ import annotations

import pytest
from fake_kube_api import FakeKube
from k8s_testing import Operators, job_manifest, until

from lattice.api import parse_job
from lattice.common.http import BackgroundService
from lattice.operator.core import LABEL_JOB
from lattice.operator.kubernetes.children import FINALIZER
from lattice.operator.kubernetes.runner import LeaderConfig
from lattice.rendezvous.client import AdminClient

EXABITS = "exabits.ai/v1"


def _status(kube: FakeKube, name: str, api: str = EXABITS) -> dict:
    return ((kube.get(api, "trainingjobs", "team", name) or {}).get("status")) or {}


def _live(kube: FakeKube, job: str) -> list[dict]:
    return [
        p
        for p in kube.pods("team", f"{LABEL_JOB}={job}")
        if p["status"]["phase"] == "Running" and not p["metadata"].get("deletionTimestamp")
    ]


def _metric(process: object, name: str) -> float:
    value = process.metrics.registry.get_sample_value(name)  # type: ignore[attr-defined]
    return float(value or 0.0)


async def test_status_and_finalizer_survive_conflicting_writers(
    kube: FakeKube, operators: Operators
) -> None:
    kube.add_node("node-0", {"pods": "4"})
    kube.inject_conflicts(EXABITS, "trainingjobs", 2)  # adding the finalizer races twice
    kube.inject_conflicts(EXABITS, "trainingjobs/status", 3)  # so do the first status writes
    kube.create(EXABITS, "trainingjobs", job_manifest("racy", min_size=2, max_size=2))
    process = await operators.start()
    await until(lambda: _status(kube, "racy").get("phase") == "Running", what="Running")
    stored = kube.get(EXABITS, "trainingjobs", "team", "racy")
    assert stored["metadata"]["finalizers"] == [FINALIZER]
    # the concurrent writes happened and were kept (re-read, not overwritten blindly)
    assert stored["metadata"]["annotations"]["fake.lattice/concurrent-writes"] == "5"
    assert _metric(process, "lattice_operator_conflicts_total") >= 5
    assert _status(kube, "racy")["targetSize"] == 2


@pytest.mark.parametrize("policy", ["Running", "None"])
async def test_delete_releases_target_stops_workers_and_drops_finalizer(
    kube: FakeKube,
    operators: Operators,
    rendezvous: BackgroundService,
    admin_token: str,
    policy: str,
) -> None:
    kube.add_node("node-0", {"pods": "4"})
    manifest = job_manifest("gone", min_size=2, max_size=2, runPolicy={"cleanPodPolicy": policy})
    kube.create(EXABITS, "trainingjobs", manifest)
    await operators.start()
    await until(lambda: _status(kube, "gone").get("phase") == "Running", what="Running")
    job_id = parse_job(kube.get(EXABITS, "trainingjobs", "team", "gone")).job_id
    assert job_id.startswith("team.gone.")
    async with AdminClient(rendezvous.endpoint, admin_token) as admin:
        assert (await admin.job_status(job_id))["target"] == 2

        kube.delete(EXABITS, "trainingjobs", "team", "gone")  # held by the finalizer
        await until(
            lambda: kube.get(EXABITS, "trainingjobs", "team", "gone") is None,
            what="the finalizer to be removed",
        )
        assert (await admin.job_status(job_id))["target"] is None
    operator_deletes = {(n, g) for p, _, n, g in kube.deletions if p == "pods"}
    if policy == "Running":  # stopped by the operator, gracefully (checkpoint on SIGTERM)
        assert operator_deletes == {("gone-worker-0", None), ("gone-worker-1", None)}
    else:
        assert operator_deletes == set()
    # whatever is left goes with the owner: pods, Service, Secret
    await until(
        lambda: (
            not kube.pods("team")
            and not kube.list("v1", "services", "team")
            and not kube.list("v1", "secrets", "team")
        ),
        what="garbage collection of the children",
    )


async def test_watches_drive_the_operator_and_recover_from_410(
    kube: FakeKube, operators: Operators
) -> None:
    kube.add_node("node-0", {"pods": "4"})
    await operators.start(resync_s=600.0)  # only watch events can wake it in time
    kube.create(EXABITS, "trainingjobs", job_manifest("w1", max_size=1))
    await until(lambda: len(_live(kube, "w1")) == 1, what="a worker from a watch event")

    kube.compact()
    kube.drop_watches()  # watches resume from versions the server forgot
    await until(lambda: kube.gone_sent >= 1, what="a 410 Gone")
    kube.create(EXABITS, "trainingjobs", job_manifest("w2", max_size=1))
    await until(lambda: len(_live(kube, "w2")) == 1, what="a worker after relisting")


async def test_only_the_leader_acts_and_a_standby_takes_over(
    kube: FakeKube, operators: Operators
) -> None:
    kube.add_node("node-0", {"pods": "4"})
    lease = LeaderConfig(namespace="lattice-system", lease_s=2.0, renew_deadline_s=1.5, renew_s=0.2)
    a = await operators.start(leader=lease, identity="replica-a")
    await until(lambda: a.elector is not None and a.elector.leading, what="a leads")
    b = await operators.start(leader=lease, identity="replica-b")
    await until(lambda: b.elector is not None and b.elector.contacted, what="b campaigns")
    assert b.ready()  # a standby is ready (rolling updates go on) …

    kube.create(EXABITS, "trainingjobs", job_manifest("led", min_size=2, max_size=2))
    await until(lambda: len(_live(kube, "led")) == 2, what="workers from the leader")
    assert _metric(b, "lattice_operator_cycles_total") == 0  # … but never acts
    assert _metric(b, "lattice_operator_leader") == 0 and _metric(a, "lattice_operator_leader")

    # a dies without releasing the lease: b waits for it to expire, then takes over
    assert a.elector is not None

    async def no_release() -> None:
        return None

    a.elector.release = no_release  # type: ignore[method-assign]
    await operators.stop(a)
    await until(lambda: b.elector is not None and b.elector.leading, what="b leads")
    record = kube.get("coordination.k8s.io/v1", "leases", "lattice-system", "lattice-operator")
    assert record["spec"]["holderIdentity"] == "replica-b"
    assert record["spec"]["leaseTransitions"] == 1

    kube.fail_pod("team", "led-worker-0", exit_code=1)
    await until(
        lambda: _status(kube, "led").get("restarts") == 1 and len(_live(kube, "led")) == 2,
        what="the new leader replaces the failed worker",
    )

    await operators.stop(b)  # a clean stop hands the lease back at once
    record = kube.get("coordination.k8s.io/v1", "leases", "lattice-system", "lattice-operator")
    assert record["spec"]["holderIdentity"] == ""
