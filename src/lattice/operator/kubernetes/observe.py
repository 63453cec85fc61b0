"""Reading the cluster into what the core understands: pods → `WorkerState`s, and nodes and
pods → the capacity of a slot pool. Pure functions on plain Kubernetes objects.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from lattice.api.job import WORKER_INFIX
from lattice.api.pod import quantity_value
from lattice.operator.core import LABEL_INDEX, WorkerPhase, WorkerState

Obj = dict[str, Any]
TERMINAL_POD_PHASES = frozenset({"Succeeded", "Failed"})


def timestamp(text: str | None) -> float | None:
    """An RFC 3339 time (``2024-05-01T10:00:00Z``) as seconds since the epoch."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _index(pod: Obj) -> int:
    meta = pod["metadata"]
    raw = (meta.get("labels") or {}).get(LABEL_INDEX)
    if raw is None:
        raw = meta["name"].rpartition(WORKER_INFIX)[2]
    try:
        return int(raw)
    except ValueError:
        return -1


def _unschedulable(status: Obj) -> bool:
    return any(
        c.get("type") == "PodScheduled"
        and c.get("status") == "False"
        and c.get("reason") == "Unschedulable"
        for c in status.get("conditions") or []
    )


def _terminated(status: Obj, container: str) -> Obj | None:
    """The training container's termination record, if it ended."""
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") == container:
            state = cs.get("state") or {}
            return state.get("terminated") or (cs.get("lastState") or {}).get("terminated")
    return None


def worker_state(pod: Obj, container: str) -> WorkerState:
    """One worker pod as the core sees it. ``container`` is the training container's name.

    A pod in phase Unknown (its node stopped reporting) counts as a failed worker: the
    rendezvous has already ended its round, and a replacement can start elsewhere.
    """
    meta, status = pod["metadata"], pod.get("status") or {}
    phase_text = status.get("phase") or "Pending"
    exit_code: int | None = None
    message = ""
    phase: WorkerPhase
    if phase_text in ("Succeeded", "Failed"):
        phase = phase_text  # type: ignore[assignment]
        ended = _terminated(status, container)
        if ended is not None:
            exit_code = ended.get("exitCode")
            message = ": ".join(x for x in (ended.get("reason"), ended.get("message")) if x)
        if not message:
            message = ": ".join(x for x in (status.get("reason"), status.get("message")) if x)
    elif phase_text == "Running":
        phase = "Running"
    elif phase_text == "Unknown":
        phase, message = "Failed", "node lost (pod phase Unknown)"
    else:
        phase = "Unschedulable" if _unschedulable(status) else "Pending"
    return WorkerState(
        name=meta["name"],
        index=_index(pod),
        phase=phase,
        exit_code=exit_code,
        message=message,
        created=timestamp(meta.get("creationTimestamp")),
        start_time=timestamp(status.get("startTime")),
        uid=str(meta.get("uid") or ""),
        deleting=bool(meta.get("deletionTimestamp")),
    )


def waiting_reasons(pod: Obj) -> set[str]:
    """Why the pod's containers wait (``CreateContainerConfigError``, ``ErrImagePull`` …)."""
    out = set()
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        reason = ((cs.get("state") or {}).get("waiting") or {}).get("reason")
        if reason:
            out.add(str(reason))
    return out


# -- capacity ---------------------------------------------------------------------------


def node_schedulable(node: Obj) -> bool:
    """Ready and not cordoned. Taints are not judged: GPU nodes are commonly tainted for the
    very pods that tolerate them."""
    if (node.get("spec") or {}).get("unschedulable"):
        return False
    conditions = (node.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _amount(resources: Obj, unit: str) -> float:
    raw = (resources.get("requests") or {}).get(unit, (resources.get("limits") or {}).get(unit))
    if raw is None:
        return 0.0
    try:
        return quantity_value(str(raw))
    except ValueError:
        return 0.0


def pod_usage(pod: Obj, unit: str) -> float:
    """How much of ``unit`` a pod holds on its node (requests, else limits, like the
    scheduler; init containers run before the others, so the larger of the two counts)."""
    if unit == "pods":
        return 1.0
    spec = pod.get("spec") or {}
    main = sum(_amount(c.get("resources") or {}, unit) for c in spec.get("containers") or [])
    init = max(
        (_amount(c.get("resources") or {}, unit) for c in spec.get("initContainers") or []),
        default=0.0,
    )
    return max(main, init)


def pool_capacity(
    unit: str, nodes: Iterable[Obj], pods: Iterable[Obj], in_pool: Callable[[Obj], bool]
) -> int:
    """Slots of ``unit`` the pool's jobs can share: on every schedulable node, its allocatable
    amount minus what the pods outside the pool hold there (whole slots per node)."""
    used: dict[str, float] = {}
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        if not node or (pod.get("status") or {}).get("phase") in TERMINAL_POD_PHASES:
            continue
        if in_pool(pod):
            continue
        used[node] = used.get(node, 0.0) + pod_usage(pod, unit)
    total = 0
    for node in nodes:
        if not node_schedulable(node):
            continue
        raw = ((node.get("status") or {}).get("allocatable") or {}).get(unit)
        if raw is None:
            continue
        try:
            allocatable = quantity_value(str(raw))
        except ValueError:
            continue
        free = allocatable - used.get(node["metadata"]["name"], 0.0)
        total += max(0, math.floor(free + 1e-9))
    return total
