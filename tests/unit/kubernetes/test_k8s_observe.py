"""Pods as workers, and nodes and pods as the capacity of a slot pool."""

from __future__ import annotations

from typing import Any

import pytest

from lattice.operator.core import LABEL_INDEX
from lattice.operator.kubernetes.observe import pod_usage, pool_capacity, worker_state


def _pod(name: str = "j-worker-2", phase: str = "Pending", **status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "uid": "uid-" + name,
            "labels": {LABEL_INDEX: name.rsplit("-", 1)[1]},
            "creationTimestamp": "2024-05-01T10:00:00Z",
        },
        "spec": {"containers": [{"name": "trainingjob"}]},
        "status": {"phase": phase, **status},
    }


def _terminated(code: int, reason: str, name: str = "trainingjob") -> list[dict[str, Any]]:
    return [{"name": name, "state": {"terminated": {"exitCode": code, "reason": reason}}}]


def test_running_pod_is_a_running_worker_with_times_and_uid() -> None:
    w = worker_state(_pod(phase="Running", startTime="2024-05-01T10:00:05Z"), "trainingjob")
    assert (w.name, w.index, w.phase, w.uid) == ("j-worker-2", 2, "Running", "uid-j-worker-2")
    assert w.created == 1714557600.0 and w.start_time == 1714557605.0
    assert not w.deleting


def test_failed_pod_reports_the_training_containers_exit() -> None:
    statuses = _terminated(0, "Completed", "sidecar") + _terminated(137, "OOMKilled")
    w = worker_state(_pod(phase="Failed", containerStatuses=statuses), "trainingjob")
    assert (w.phase, w.exit_code, w.message) == ("Failed", 137, "OOMKilled")


def test_evicted_pod_without_container_record_uses_the_pod_reason() -> None:
    w = worker_state(_pod(phase="Failed", reason="Evicted", message="low on memory"), "trainingjob")
    assert (w.phase, w.exit_code, w.message) == ("Failed", None, "Evicted: low on memory")


@pytest.mark.parametrize(
    ("status", "phase"),
    [
        (
            {
                "conditions": [
                    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
                ]
            },
            "Unschedulable",
        ),
        ({"conditions": [{"type": "PodScheduled", "status": "True"}]}, "Pending"),
        ({}, "Pending"),
    ],
)
def test_pending_pods(status: dict[str, Any], phase: str) -> None:
    assert worker_state(_pod(**status), "trainingjob").phase == phase


def test_unknown_phase_is_a_lost_worker_and_deleting_is_seen() -> None:
    pod = _pod(phase="Unknown")
    pod["metadata"]["deletionTimestamp"] = "2024-05-01T10:01:00Z"
    w = worker_state(pod, "trainingjob")
    assert w.phase == "Failed" and w.exit_code is None and "node lost" in w.message
    assert w.deleting


def _node(name: str, alloc: dict[str, str], *, ready: bool = True, cordoned: bool = False):
    return {
        "metadata": {"name": name},
        "spec": {"unschedulable": True} if cordoned else {},
        "status": {
            "allocatable": alloc,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def _user_pod(node: str, cpu: str, phase: str = "Running", init_cpu: str | None = None):
    spec: dict[str, Any] = {
        "nodeName": node,
        "containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}],
    }
    if init_cpu is not None:
        spec["initContainers"] = [{"name": "i", "resources": {"limits": {"cpu": init_cpu}}}]
    return {"metadata": {"name": f"p-{node}-{cpu}"}, "spec": spec, "status": {"phase": phase}}


def test_capacity_counts_ready_uncordoned_nodes_minus_other_pods() -> None:
    nodes = [
        _node("a", {"cpu": "4", "pods": "110"}),
        _node("b", {"cpu": "3500m", "pods": "110"}),
        _node("c", {"cpu": "64"}, ready=False),
        _node("d", {"cpu": "64"}, cordoned=True),
        _node("e", {"pods": "110"}),  # no cpu to give
    ]
    pods = [
        _user_pod("a", "1500m"),
        _user_pod("a", "8", phase="Succeeded"),  # finished: holds nothing
        _user_pod("b", "500m"),
    ]
    # a: 4 - 1.5 = 2.5 → 2; b: 3.5 - 0.5 = 3; c, d not schedulable; e has no cpu
    assert pool_capacity("cpu", nodes, pods, lambda p: False) == 5
    # pods of the pool itself are not subtracted
    assert pool_capacity("cpu", nodes, pods, lambda p: p["metadata"]["name"] == "p-a-1500m") == 7
    assert pool_capacity("pods", nodes, pods, lambda p: False) == 110 - 1 + 110 - 1 + 110


def test_usage_of_a_pod_includes_init_containers_and_extended_resources() -> None:
    assert pod_usage(_user_pod("a", "1", init_cpu="3"), "cpu") == 3.0
    assert pod_usage(_user_pod("a", "2", init_cpu="1"), "cpu") == 2.0
    gpu_pod = {
        "spec": {"containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": 2}}}]}
    }
    assert pod_usage(gpu_pod, "nvidia.com/gpu") == 2.0
    assert pod_usage(gpu_pod, "pods") == 1.0
    assert (
        pool_capacity(
            "nvidia.com/gpu",
            [_node("g", {"nvidia.com/gpu": "8"})],
            [{**gpu_pod, "metadata": {"name": "x"}, "spec": {**gpu_pod["spec"], "nodeName": "g"}}],
            lambda p: False,
        )
        == 6
    )
