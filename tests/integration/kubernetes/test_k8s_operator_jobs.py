"""The operator against the fake API server: a job's children, status, both API groups,
failures, invalid specs, and the verbs it uses."""

from __future__ import annotations

import asyncio
import base64

import pytest
from fake_kube_api import FakeKube
from k8s_testing import Operators, job_manifest, until

from lattice.api import parse_job
from lattice.checkpoint.client import CheckpointClient
from lattice.common.auth import Authenticator
from lattice.common.http import BackgroundService
from lattice.operator.core import LABEL_INDEX, LABEL_JOB, worker_command
from lattice.operator.kubernetes.children import (
    DEFAULT_WORKER_GRACE_S,
    FINALIZER,
    SHM_VOLUME,
    secret_name,
    service_name,
)
from lattice.rendezvous.client import AdminClient

EXABITS = "exabits.ai/v1"
BREEZEML = "breezeml.ai/v1"


def _status(kube: FakeKube, api: str, name: str, ns: str = "team") -> dict:
    job = kube.get(api, "trainingjobs", ns, name)
    return (job or {}).get("status") or {}


def _running_pods(kube: FakeKube, job: str, ns: str = "team") -> list[dict]:
    return [
        p
        for p in kube.pods(ns, f"{LABEL_JOB}={job}")
        if p["status"]["phase"] == "Running" and not p["metadata"].get("deletionTimestamp")
    ]


@pytest.mark.parametrize("api", [EXABITS, BREEZEML])
async def test_job_gets_wrapped_workers_service_secret_and_status(
    kube: FakeKube,
    operators: Operators,
    rendezvous: BackgroundService,
    checkpoint_service: BackgroundService,
    admin_token: str,
    api: str,
) -> None:
    for i in range(2):
        kube.add_node(f"node-{i}", {"cpu": "4", "pods": "2"})
    manifest = job_manifest("resnet", group=api.split("/")[0], min_size=2, max_size=3)
    created = kube.create(api, "trainingjobs", manifest)
    await operators.start()

    await until(lambda: _status(kube, api, "resnet").get("phase") == "Running", what="Running")
    status = _status(kube, api, "resnet")
    assert status["targetSize"] == 3 and status["size"] == 3  # 2 nodes x 2 pods, max 3

    job = parse_job(kube.get(api, "trainingjobs", "team", "resnet"))
    pods = kube.pods("team", f"{LABEL_JOB}=resnet")
    assert sorted(p["metadata"]["name"] for p in pods) == [f"resnet-worker-{i}" for i in range(3)]
    expected = worker_command(
        job,
        rendezvous_endpoint=rendezvous.endpoint,
        checkpoint_endpoint=checkpoint_service.endpoint,
        job_id=job.job_id,
    )
    owner = {
        "apiVersion": api,
        "kind": "TrainingJob",
        "name": "resnet",
        "uid": created["metadata"]["uid"],
        "controller": True,
    }
    for pod in pods:
        meta, spec = pod["metadata"], pod["spec"]
        assert meta["ownerReferences"] == [owner]
        assert meta["labels"][LABEL_JOB] == "resnet"
        assert meta["labels"]["team"] == "vision"  # template labels kept
        assert meta["labels"][LABEL_INDEX] == meta["name"].rsplit("-", 1)[1]
        container = spec["containers"][0]
        assert container["command"] == expected  # wrapped in `lattice run`, args folded in
        assert container["command"][:2] == ["lattice", "run"]
        assert container["command"][-6:] == [
            "--no-python",
            "python",
            "-u",
            "main.py",
            "--epochs",
            "3",
        ]
        assert "args" not in container
        env = {e["name"]: e for e in container["env"]}
        assert env["USER_SETTING"]["value"] == "kept"
        assert env["LATTICE_NODE_ID"]["value"] == meta["name"]
        assert env["LATTICE_CHECKPOINT_ENDPOINT"]["value"] == checkpoint_service.endpoint
        assert env["LATTICE_TOKEN"] == {
            "name": "LATTICE_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": secret_name("resnet"), "key": "token"}},
        }
        assert spec["restartPolicy"] == "Never"
        assert spec["automountServiceAccountToken"] is False
        assert spec["terminationGracePeriodSeconds"] == DEFAULT_WORKER_GRACE_S
        assert {"name": SHM_VOLUME, "mountPath": "/dev/shm"} in container["volumeMounts"]
        assert {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}} in spec["volumes"]
        assert spec["hostname"] == meta["name"]
        assert spec["subdomain"] == service_name("resnet")
        assert spec["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
        assert spec["futureField"] == {"kept": True}  # unknown template fields reach the pod

    service = kube.get("v1", "services", "team", service_name("resnet"))
    assert service is not None and service["metadata"]["ownerReferences"] == [owner]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {LABEL_JOB: "resnet"}

    secret = kube.get("v1", "secrets", "team", secret_name("resnet"))
    assert secret is not None and secret["metadata"]["ownerReferences"] == [owner]
    token = base64.b64decode(secret["data"]["token"]).decode()
    caller = Authenticator(admin_token).identify(token)
    assert caller is not None and not caller.admin and caller.job == job.job_id

    stored = kube.get(api, "trainingjobs", "team", "resnet")
    assert FINALIZER in stored["metadata"]["finalizers"]
    async with AdminClient(rendezvous.endpoint, admin_token) as admin:
        assert (await admin.job_status(job.job_id))["target"] == 3
    reasons = {e["reason"] for e in kube.list("v1", "events", "team")}
    assert {"Admitted", "Pending"} <= reasons

    # a checkpoint the workers commit (with the job token) shows in the status
    def commit() -> None:
        with CheckpointClient(checkpoint_service.endpoint, job.job_id, token) as client:
            client.commit(120, {"model": client.put_shard(120, "model", b"weights")}, {})

    await asyncio.to_thread(commit)
    await until(
        lambda: (_status(kube, api, "resnet").get("lastCheckpoint") or {}).get("step") == 120,
        what="lastCheckpoint in the status",
    )


async def test_no_admin_token_anywhere_a_worker_can_see(
    kube: FakeKube, operators: Operators, admin_token: str
) -> None:
    kube.add_node("node-0", {"pods": "4"})
    kube.create(EXABITS, "trainingjobs", job_manifest("a", min_size=1, max_size=2))
    await operators.start()
    await until(lambda: len(_running_pods(kube, "a")) == 2, what="2 workers")
    visible = repr(kube.list("v1", "pods")) + repr(kube.list("v1", "secrets"))
    decoded = [
        base64.b64decode(v).decode()
        for s in kube.list("v1", "secrets")
        for v in s.get("data", {}).values()
    ]
    assert admin_token not in visible and admin_token not in "".join(decoded)


async def test_failed_worker_is_replaced_and_counted(kube: FakeKube, operators: Operators) -> None:
    kube.add_node("node-0", {"pods": "2"})
    kube.create(EXABITS, "trainingjobs", job_manifest("f", min_size=2, max_size=2))
    await operators.start()
    await until(lambda: len(_running_pods(kube, "f")) == 2, what="2 workers")
    old = {p["metadata"]["name"]: p["metadata"]["uid"] for p in _running_pods(kube, "f")}

    kube.fail_pod("team", "f-worker-1", exit_code=137, reason="OOMKilled")
    await until(
        lambda: (
            {
                p["metadata"]["name"]
                for p in _running_pods(kube, "f")
                if p["metadata"]["uid"] != old.get(p["metadata"]["name"])
            }
            == {"f-worker-1"}
        ),
        what="a replacement for f-worker-1",
    )
    assert _running_pods(kube, "f")[0]["metadata"]["uid"] == old["f-worker-0"]  # untouched
    status = await until(
        lambda: (s := _status(kube, EXABITS, "f")).get("phase") == "Running" and s,
        what="Running again",
    )
    assert status["restarts"] == 1
    assert "OOMKilled" in status["workerError"]
    # the failed pod was removed at once, not after a grace period
    assert ("pods", "team", "f-worker-1", 0) in kube.deletions
    warnings = [e for e in kube.list("v1", "events", "team") if e["type"] == "Warning"]
    assert any(e["reason"] == "WorkerFailed" and "f-worker-1" in e["message"] for e in warnings)


async def test_invalid_job_is_failed_with_the_reason_once(
    kube: FakeKube, operators: Operators
) -> None:
    kube.add_node("node-0", {"pods": "2"})
    bad = job_manifest("bad")
    bad["spec"]["replicaSpecs"]["template"]["spec"]["containers"][0]["command"] = []
    kube.create(EXABITS, "trainingjobs", bad)
    process = await operators.start()

    def invalid_events() -> list[dict]:
        return [e for e in kube.list("v1", "events", "team") if e["reason"] == "InvalidSpec"]

    await until(invalid_events, what="an InvalidSpec event")
    status = _status(kube, EXABITS, "bad")
    assert status["phase"] == "Failed"
    assert "command" in status["message"] and "fix:" in status["message"]
    assert kube.pods("team") == []
    cycles = process.metrics.registry.get_sample_value("lattice_operator_cycles_total")
    await until(
        lambda: (
            process.metrics.registry.get_sample_value("lattice_operator_cycles_total") >= cycles + 2
        ),
        what="two more cycles",
    )
    assert len(invalid_events()) == 1  # reported once, not every cycle


async def test_same_name_in_both_groups_runs_only_the_older(
    kube: FakeKube, operators: Operators
) -> None:
    kube.add_node("node-0", {"pods": "4"})
    kube.create(EXABITS, "trainingjobs", job_manifest("twin", max_size=1))
    kube.create(BREEZEML, "trainingjobs", job_manifest("twin", group="breezeml.ai", max_size=1))
    await operators.start()
    status = await until(
        lambda: (
            _status(kube, BREEZEML, "twin").get("phase") == "Failed"
            and _status(kube, BREEZEML, "twin")
        ),
        what="the younger twin Failed",
    )
    assert "exabits.ai/v1" in status["message"]
    await until(lambda: _status(kube, EXABITS, "twin").get("phase") == "Running", what="Running")
    assert len(kube.pods("team")) == 1


async def test_finished_job_succeeds_then_goes_after_its_ttl(
    kube: FakeKube, operators: Operators
) -> None:
    kube.add_node("node-0", {"pods": "4"})
    kube.create(EXABITS, "trainingjobs", job_manifest("done", min_size=2, max_size=2))
    kube.create(
        EXABITS,
        "trainingjobs",
        job_manifest("brief", max_size=1, runPolicy={"ttlSecondsAfterFinished": 0}),
    )
    await operators.start()
    await until(lambda: len(_running_pods(kube, "done")) == 2, what="2 workers")
    await until(lambda: len(_running_pods(kube, "brief")) == 1, what="1 worker")
    for name in ("done-worker-0", "done-worker-1", "brief-worker-0"):
        kube.succeed_pod("team", name)

    status = await until(
        lambda: (s := _status(kube, EXABITS, "done")).get("phase") == "Succeeded" and s,
        what="Succeeded",
    )
    assert status["completionTime"] and status["targetSize"] == 0
    # cleanPodPolicy Running (the default) keeps finished workers for their logs
    assert {p["status"]["phase"] for p in kube.pods("team", f"{LABEL_JOB}=done")} == {"Succeeded"}
    await until(
        lambda: kube.get(EXABITS, "trainingjobs", "team", "brief") is None,
        what="the job deleted after ttlSecondsAfterFinished",
    )
