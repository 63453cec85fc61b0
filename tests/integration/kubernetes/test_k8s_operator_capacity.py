"""Capacity on the fake cluster: nodes come and go, jobs of both groups share the pool, and
other pods' usage is subtracted."""

from __future__ import annotations

from fake_kube_api import FakeKube
from k8s_testing import Operators, job_manifest, until

from lattice.operator.core import LABEL_JOB

EXABITS = "exabits.ai/v1"
BREEZEML = "breezeml.ai/v1"


def _live(kube: FakeKube, job: str) -> list[str]:
    """Names of the job's workers that are not being deleted."""
    return sorted(
        p["metadata"]["name"]
        for p in kube.pods("team", f"{LABEL_JOB}={job}")
        if not p["metadata"].get("deletionTimestamp")
    )


def _target(kube: FakeKube, api: str, job: str) -> int:
    obj = kube.get(api, "trainingjobs", "team", job) or {}
    return int((obj.get("status") or {}).get("targetSize") or 0)


async def test_job_grows_when_a_node_joins_and_shrinks_when_it_goes(
    kube: FakeKube, operators: Operators
) -> None:
    kube.add_node("node-0", {"cpu": "2", "pods": "10"})
    kube.create(EXABITS, "trainingjobs", job_manifest("elastic", max_size=4, cpu="1"))
    await operators.start()
    await until(lambda: _target(kube, EXABITS, "elastic") == 2, what="size 2 on one node")
    await until(lambda: len(_live(kube, "elastic")) == 2, what="2 workers")

    kube.add_node("node-1", {"cpu": "2", "pods": "10"})
    await until(lambda: _target(kube, EXABITS, "elastic") == 4, what="grow to 4")
    await until(lambda: len(_live(kube, "elastic")) == 4, what="4 workers")

    kube.remove_node("node-1")  # its two workers vanish with it
    await until(lambda: _target(kube, EXABITS, "elastic") == 2, what="shrink to 2")
    await until(lambda: len(_live(kube, "elastic")) == 2, what="2 workers again")
    phases = {p["status"]["phase"] for p in kube.pods("team", f"{LABEL_JOB}=elastic")}
    assert phases == {"Running"}


async def test_two_jobs_of_both_groups_share_the_pool(kube: FakeKube, operators: Operators) -> None:
    kube.add_node("node-0", {"cpu": "4", "pods": "10"})
    kube.create(EXABITS, "trainingjobs", job_manifest("first", min_size=1, max_size=4, cpu="1"))
    await operators.start()
    await until(lambda: len(_live(kube, "first")) == 4, what="first takes the whole pool")

    kube.create(
        BREEZEML,
        "trainingjobs",
        job_manifest("second", group="breezeml.ai", min_size=2, max_size=4, cpu="1"),
    )
    await until(
        lambda: _target(kube, EXABITS, "first") == 2 and _target(kube, BREEZEML, "second") == 2,
        what="an equal split",
    )
    await until(
        lambda: (
            _live(kube, "first") == ["first-worker-0", "first-worker-1"]
            and len(_live(kube, "second")) == 2
        ),
        what="first shrunk to its lowest indexes, second started",
    )
    # the shrink stopped running workers gracefully: their own grace period, not 0
    shrunk = {(n, g) for p, ns, n, g in kube.deletions if n.startswith("first-worker-")}
    assert shrunk == {("first-worker-2", None), ("first-worker-3", None)}
    resized = [e for e in kube.list("v1", "events", "team") if e["reason"] == "Resized"]
    assert any("4 -> 2" in e["message"] for e in resized)


async def test_other_pods_usage_is_subtracted(kube: FakeKube, operators: Operators) -> None:
    kube.add_node("node-0", {"cpu": "4", "pods": "10"})
    kube.create(
        "v1",
        "pods",
        {
            "metadata": {"name": "someone-else", "namespace": "other"},
            "spec": {
                "containers": [
                    {"name": "c", "image": "x", "resources": {"requests": {"cpu": "1500m"}}}
                ]
            },
        },
    )
    kube.create(EXABITS, "trainingjobs", job_manifest("polite", max_size=4, cpu="1"))
    process = await operators.start()
    await until(lambda: len(_live(kube, "polite")) == 2, what="2 workers (4 - 1.5 cpu)")
    assert (
        process.metrics.registry.get_sample_value(
            "lattice_operator_capacity_slots", {"unit": "cpu"}
        )
        == 2.0
    )
