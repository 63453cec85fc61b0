"""What the operator creates for a job, as plain Kubernetes objects: worker pods, the
job's headless Service, its token Secret, and Events. Pure functions, no I/O.

Every child carries a controller owner reference to its TrainingJob, so Kubernetes garbage
collects it with the job. ``blockOwnerDeletion`` is left unset: setting it would need update
rights on ``trainingjobs/finalizers`` (owner-reference permission enforcement), which the
operator does not otherwise need.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import secrets
from datetime import UTC, datetime
from typing import Any

from lattice.api.job import TrainingJob
from lattice.common import node_local
from lattice.operator.core import LABEL_JOB, CreateWorker, EmitEvent

Obj = dict[str, Any]

FINALIZER = "lattice.exabits.ai/cleanup"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "lattice-operator"
TOKEN_KEY = "token"
COMPONENT = "lattice-operator"
# The agent, on SIGTERM, waits up to 30 s for the training processes to reach a safe point and
# checkpoint (its safepoint timeout), then SIGTERM → SIGKILL after 3 s, or up to 60 s for a
# process still writing its checkpoint (its save grace); 120 s leaves room for the upload and
# the agent's goodbye to the rendezvous. A template's own value is kept.
DEFAULT_WORKER_GRACE_S = 120
# Containers get a 64 MiB /dev/shm: too small for the addon's node-local checkpoints (and for
# DataLoader workers' batches). Worker pods get a memory-backed volume there instead.
SHM_VOLUME = "lattice-shm"
SHM_PATH = str(node_local.SHM)
# Settings the operator owns in the training container's environment (user values replaced).
MANAGED_ENV = ("LATTICE_TOKEN", "LATTICE_NODE_ID", "LATTICE_CHECKPOINT_ENDPOINT")


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def owner_reference(job: Obj) -> Obj:
    meta = job["metadata"]
    return {
        "apiVersion": job["apiVersion"],
        "kind": job["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
    }


def controller_uid(obj: Obj) -> str | None:
    """The uid of the object's controlling owner, if any."""
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


def secret_name(job_name: str) -> str:
    return f"{job_name}-lattice-token"


def service_name(job_name: str) -> str:
    """The job's headless Service: ``<job>-workers``, a DNS-1035 label (starts with a letter,
    at most 63 characters), shortened with a digest when the job name does not allow that."""
    name = f"{job_name}-workers"
    if len(name) <= 63 and job_name[0].isalpha():
        return name
    base = job_name if job_name[0].isalpha() else f"j-{job_name}"
    digest = hashlib.sha256(job_name.encode()).hexdigest()[:8]
    return f"{base[:50].rstrip('-')}-{digest}"


def _child_meta(job: Obj, name: str, labels: dict[str, str] | None = None) -> Obj:
    meta = job["metadata"]
    return {
        "name": name,
        "namespace": meta["namespace"],
        "labels": {**(labels or {}), LABEL_JOB: meta["name"], MANAGED_BY_LABEL: MANAGED_BY},
        "ownerReferences": [owner_reference(job)],
    }


def token_secret(job: Obj, token: str) -> Obj:
    """The job's Secret: its job token (never the admin token), for ``LATTICE_TOKEN``."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _child_meta(job, secret_name(job["metadata"]["name"])),
        "type": "Opaque",
        "data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def headless_service(job: Obj) -> Obj:
    """DNS for the workers (``<pod>.<service>.<namespace>.svc``), ready or not."""
    name = job["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _child_meta(job, service_name(name)),
        "spec": {
            "clusterIP": "None",
            "selector": {LABEL_JOB: name},
            "publishNotReadyAddresses": True,
        },
    }


def worker_pod(
    job: TrainingJob,
    raw: Obj,
    action: CreateWorker,
    *,
    checkpoint_endpoint: str | None,
    grace_s: int = DEFAULT_WORKER_GRACE_S,
) -> Obj:
    """The job's pod template as written, made into worker ``action.name``.

    The training container's command becomes ``action.command`` (its args are folded into
    it), and it gets ``action.env``, the node id, the checkpoint endpoint and ``LATTICE_TOKEN``
    from the job's Secret. ``restartPolicy: Never``: the agent restarts workers inside the
    pod, and a pod that fails is replaced by the operator, which counts it. A memory volume at
    ``/dev/shm`` holds the node-local checkpoints (`_mount_shm`).
    """
    template = job.spec.template.to_dict()
    tmeta = template.get("metadata") or {}
    spec = copy.deepcopy(template["spec"])
    meta = _child_meta(raw, action.name, {**(tmeta.get("labels") or {}), **action.labels})
    if tmeta.get("annotations"):
        meta["annotations"] = dict(tmeta["annotations"])
    spec["restartPolicy"] = "Never"
    spec["hostname"] = action.name
    spec["subdomain"] = service_name(job.name)
    spec.setdefault("terminationGracePeriodSeconds", grace_s)
    spec.setdefault("automountServiceAccountToken", False)
    container = next(c for c in spec["containers"] if c["name"] == action.container)
    container["command"] = list(action.command)
    container.pop("args", None)
    # A failed worker's last output lines become its termination message, which the operator
    # copies into status.workerError (the script's own error, not just an exit code).
    container.setdefault("terminationMessagePolicy", "FallbackToLogsOnError")
    managed = {*MANAGED_ENV, *action.env}
    env = [e for e in container.get("env") or [] if e.get("name") not in managed]
    env += [{"name": k, "value": v} for k, v in sorted(action.env.items())]
    env.append({"name": "LATTICE_NODE_ID", "value": action.name})
    if checkpoint_endpoint:
        env.append({"name": "LATTICE_CHECKPOINT_ENDPOINT", "value": checkpoint_endpoint})
    env.append(
        {
            "name": "LATTICE_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": secret_name(job.name), "key": TOKEN_KEY}},
        }
    )
    container["env"] = env
    _mount_shm(spec, container)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def _mount_shm(spec: Obj, container: Obj) -> None:
    """A memory-backed ``/dev/shm`` for the training container, unless the template mounts
    something there itself (its own size limit, say). Its use counts against the container's
    memory limit: the node-local tier keeps the last two checkpoints."""
    if any(m.get("mountPath") == SHM_PATH for m in container.get("volumeMounts") or []):
        return
    volumes = spec.get("volumes") or []
    if all(v.get("name") != SHM_VOLUME for v in volumes):  # a template's own is kept
        volumes = [*volumes, {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}}]
    spec["volumes"] = volumes
    mounts = container.get("volumeMounts") or []
    container["volumeMounts"] = [*mounts, {"name": SHM_VOLUME, "mountPath": SHM_PATH}]


def event(job: Obj, action: EmitEvent, *, now: float, instance: str) -> Obj:
    """A core/v1 Event on the job (what ``kubectl describe trainingjob`` lists)."""
    meta = job["metadata"]
    stamp = rfc3339(now)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": f"{meta['name']}.{int(now * 1e9):x}{secrets.token_hex(3)}",
            "namespace": meta["namespace"],
        },
        "involvedObject": {
            "apiVersion": job["apiVersion"],
            "kind": job["kind"],
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": action.type,
        "reason": action.reason,
        "message": action.message[:1024],
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": instance,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
