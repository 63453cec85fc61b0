"""The objects the operator creates for a job: pods from the template, Service, Secret, Event."""

from __future__ import annotations

import base64
import re
from typing import Any

from lattice.agent.options import Tuning
from lattice.api import parse_job
from lattice.cli.operator import operator as operator_command
from lattice.operator.core import LABEL_INDEX, LABEL_JOB, CreateWorker, EmitEvent
from lattice.operator.kubernetes import children


def _raw(**spec: Any) -> dict[str, Any]:
    template_spec = spec.pop(
        "template_spec",
        {
            "containers": [
                {"name": "sidecar", "image": "proxy", "command": ["proxy"], "args": ["-v"]},
                {
                    "name": "trainingjob",
                    "image": "img",
                    "command": ["python", "main.py"],
                    "args": ["--lr", "0.1"],
                    "env": [
                        {"name": "LATTICE_TOKEN", "value": "user-supplied"},
                        {"name": "LATTICE_AUTOPATCH", "value": "torch"},
                        {"name": "KEEP", "value": "1"},
                    ],
                },
            ],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    )
    return {
        "apiVersion": "exabits.ai/v1",
        "kind": "TrainingJob",
        "metadata": {"name": "job", "namespace": "ns", "uid": "u-1", "resourceVersion": "7"},
        "spec": {
            "minSize": 1,
            "maxSize": 2,
            "replicaSpecs": {
                "template": {
                    "metadata": {"labels": {"a": "b"}, "annotations": {"note": "x"}},
                    "spec": template_spec,
                }
            },
            **spec,
        },
    }


def _action(env: dict[str, str] | None = None) -> CreateWorker:
    return CreateWorker(
        job="ns/job",
        name="job-worker-1",
        index=1,
        command=("lattice", "run", "--no-python", "python", "main.py", "--lr", "0.1"),
        container="trainingjob",
        env=env or {},
        labels={LABEL_JOB: "job", LABEL_INDEX: "1"},
    )


def test_worker_pod_wraps_only_the_training_container_and_owns_the_env() -> None:
    raw = _raw(framework="generic")
    pod = children.worker_pod(
        parse_job(raw),
        raw,
        _action({"LATTICE_AUTOPATCH": "none"}),
        checkpoint_endpoint="ckpt:1",
        grace_s=45,
    )
    sidecar, train = pod["spec"]["containers"]
    assert sidecar == {"name": "sidecar", "image": "proxy", "command": ["proxy"], "args": ["-v"]}
    assert train["command"][-4:] == ["python", "main.py", "--lr", "0.1"] and "args" not in train
    env = {e["name"]: e for e in train["env"]}
    assert env["KEEP"] == {"name": "KEEP", "value": "1"}
    assert env["LATTICE_AUTOPATCH"]["value"] == "none"  # the operator's setting wins
    assert env["LATTICE_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "job-lattice-token",
        "key": "token",
    }  # a user value never reaches the worker instead of the job token
    assert [e["name"] for e in train["env"]].count("LATTICE_TOKEN") == 1
    assert env["LATTICE_CHECKPOINT_ENDPOINT"]["value"] == "ckpt:1"
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["labels"] == {
        "a": "b",
        LABEL_JOB: "job",
        LABEL_INDEX: "1",
        children.MANAGED_BY_LABEL: children.MANAGED_BY,
    }
    assert meta["annotations"] == {"note": "x"}
    assert meta["ownerReferences"][0]["uid"] == "u-1" and "blockOwnerDeletion" not in str(meta)
    shm = {"name": children.SHM_VOLUME, "emptyDir": {"medium": "Memory"}}
    assert spec["volumes"] == [{"name": "data", "emptyDir": {}}, shm]
    assert train["volumeMounts"] == [{"name": children.SHM_VOLUME, "mountPath": "/dev/shm"}]
    assert "volumeMounts" not in sidecar
    template = raw["spec"]["replicaSpecs"]["template"]["spec"]
    assert "volumeMounts" not in template["containers"][1] and len(template["volumes"]) == 1
    assert spec["terminationGracePeriodSeconds"] == 45
    assert spec["restartPolicy"] == "Never"


def test_worker_pod_keeps_the_templates_own_grace_and_token_mount_choice() -> None:
    raw = _raw(
        template_spec={
            "containers": [{"name": "main", "image": "img", "command": ["python", "t.py"]}],
            "terminationGracePeriodSeconds": 300,
            "automountServiceAccountToken": True,
            "restartPolicy": "OnFailure",
        }
    )
    action = CreateWorker("ns/job", "job-worker-0", 0, ("python", "t.py"), "main")
    pod = children.worker_pod(parse_job(raw), raw, action, checkpoint_endpoint=None)
    spec = pod["spec"]
    assert spec["terminationGracePeriodSeconds"] == 300
    assert spec["automountServiceAccountToken"] is True  # an explicit choice is the user's
    assert spec["restartPolicy"] == "Never"  # failures must reach the operator
    names = [e["name"] for e in spec["containers"][0]["env"]]
    assert "LATTICE_CHECKPOINT_ENDPOINT" not in names


def test_default_grace_covers_the_agents_safe_point_and_save_grace() -> None:
    tuning = Tuning()
    stop = tuning.safepoint_timeout_s + max(tuning.kill_grace_s, tuning.save_grace_s)
    assert stop < children.DEFAULT_WORKER_GRACE_S
    grace = next(p for p in operator_command.params if p.name == "worker_grace")
    assert grace.default == children.DEFAULT_WORKER_GRACE_S  # `lattice operator`'s default


def test_worker_pod_keeps_a_templates_own_shm_mount() -> None:
    """A template that sizes its /dev/shm itself keeps it; no second volume is mounted."""
    mount = {"name": "shm", "mountPath": "/dev/shm"}
    raw = _raw(
        template_spec={
            "containers": [
                {"name": "main", "image": "img", "command": ["t"], "volumeMounts": [mount]}
            ],
            "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}],
        }
    )
    action = CreateWorker("ns/job", "job-worker-0", 0, ("t",), "main")
    spec = children.worker_pod(parse_job(raw), raw, action, checkpoint_endpoint=None)["spec"]
    assert spec["containers"][0]["volumeMounts"] == [mount]
    assert [v["name"] for v in spec["volumes"]] == ["shm"]


def test_service_names_are_dns_1035_labels() -> None:
    assert children.service_name("resnet") == "resnet-workers"
    for job in ("7up", "a" * 63, "1" + "b" * 55):
        name = children.service_name(job)
        assert re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", name) and len(name) <= 63, name
    assert children.service_name("a" * 63) != children.service_name("a" * 62)


def test_secret_holds_the_job_token_and_service_selects_the_workers() -> None:
    raw = _raw()
    secret = children.token_secret(raw, "ljt1.payload.sig")
    assert base64.b64decode(secret["data"]["token"]).decode() == "ljt1.payload.sig"
    assert secret["metadata"]["name"] == "job-lattice-token"
    service = children.headless_service(raw)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {LABEL_JOB: "job"}
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert children.controller_uid(service) == "u-1"


def test_event_points_at_the_job() -> None:
    event = children.event(
        _raw(), EmitEvent("Warning", "WorkerFailed", "boom"), now=0.0, instance="op-1"
    )
    assert event["involvedObject"]["kind"] == "TrainingJob"
    assert event["involvedObject"]["uid"] == "u-1"
    assert event["metadata"]["namespace"] == "ns" and event["metadata"]["name"].startswith("job.")
    assert (event["type"], event["reason"], event["message"]) == ("Warning", "WorkerFailed", "boom")
    assert event["firstTimestamp"] == "1970-01-01T00:00:00Z"


def test_a_templates_own_lattice_shm_volume_is_mounted_not_duplicated() -> None:
    """Two volumes of one name would make the API server reject every worker pod."""
    own = {"name": children.SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "4Gi"}}
    raw = _raw(
        template_spec={
            "containers": [{"name": "main", "image": "img", "command": ["t"]}],
            "volumes": [own],
        }
    )
    action = CreateWorker("ns/job", "job-worker-0", 0, ("t",), "main")
    spec = children.worker_pod(parse_job(raw), raw, action, checkpoint_endpoint=None)["spec"]
    assert spec["volumes"] == [own]
    assert spec["containers"][0]["volumeMounts"] == [
        {"name": children.SHM_VOLUME, "mountPath": "/dev/shm"}
    ]
