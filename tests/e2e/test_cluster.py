"""End to end on a real Kubernetes cluster (kind, k3d …), when one is reachable.

Applies the CRDs (``kubectl apply -k deploy/crds``), runs the operator against the cluster,
applies the example job in a fresh namespace and waits for it to be Running with its workers,
then deletes it and waits for the finalizer's cleanup. The job runs its command without the
agent (``injectLattice: false``) in ``$LATTICE_E2E_IMAGE`` (default ``busybox:1.36``), so no
Lattice image and no in-cluster services are needed. Without a cluster the test is skipped
and says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lattice.common.auth import new_admin_token
from lattice.common.errors import UserError
from lattice.operator.core import LABEL_JOB
from lattice.operator.kubernetes import ApiError, KubeApi, OperatorConfig, OperatorProcess
from lattice.operator.kubernetes.resources import NODES, PODS, TRAININGJOBS
from lattice.operator.kubernetes.runner import LeaderConfig

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
SKIP = "no Kubernetes cluster reachable (set KUBECONFIG to a kind/k3d cluster to run)"
IMAGE = os.environ.get("LATTICE_E2E_IMAGE", "busybox:1.36")
TIMEOUT_S = float(os.environ.get("LATTICE_E2E_TIMEOUT", "300"))


async def _reachable() -> KubeApi | None:
    try:
        api = KubeApi.connect()
    except UserError:
        return None
    try:
        async with asyncio.timeout(10):
            await api.list(NODES)
    except (ApiError, TimeoutError):
        await api.close()
        return None
    return api


def _kubectl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    return subprocess.run(
        [kubectl, *args], input=stdin, capture_output=True, text=True, timeout=120, check=True
    )


@pytest.fixture
async def cluster() -> AsyncIterator[KubeApi]:
    api = await _reachable()
    if api is None:
        pytest.skip(SKIP)
    if shutil.which("kubectl") is None:
        await api.close()
        pytest.skip(f"a cluster is reachable but kubectl is not installed; {SKIP}")
    yield api
    await api.close()


def _example_job(namespace: str) -> dict[str, Any]:
    job = yaml.safe_load((REPO / "examples" / "example-job.yaml").read_text())
    job["metadata"]["namespace"] = namespace
    container = job["spec"]["replicaSpecs"]["template"]["spec"]["containers"][0]
    container["image"] = IMAGE
    container["command"] = ["sh", "-c", "sleep 3600"]
    job["spec"]["injectLattice"] = False
    job["spec"]["maxSize"] = 2
    return dict(job)


async def _poll(check: Any, what: str) -> Any:
    deadline = asyncio.get_running_loop().time() + TIMEOUT_S
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {TIMEOUT_S}s waiting for {what}")
        await asyncio.sleep(1.0)


async def test_example_job_runs_on_a_real_cluster(cluster: KubeApi) -> None:
    namespace = f"lattice-e2e-{uuid.uuid4().hex[:6]}"
    _kubectl("apply", "-k", str(REPO / "deploy" / "crds"))
    _kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/trainingjobs.exabits.ai",
        "crd/trainingjobs.breezeml.ai",
    )
    _kubectl("create", "namespace", namespace)
    config = OperatorConfig(
        admin_token=new_admin_token(),
        rendezvous_endpoint="127.0.0.1:1",  # unused: the job runs without the agent
        namespace=namespace,
        identity="e2e-operator",
        resync_s=5.0,
        resize_cooldown_s=0.0,
    )
    process = OperatorProcess(
        cluster, config, leader=LeaderConfig(namespace=namespace), host="127.0.0.1", port=0
    )
    task = asyncio.create_task(process.serve())
    job_res = TRAININGJOBS[0]
    try:
        _kubectl("apply", "-f", "-", stdin=yaml.safe_dump(_example_job(namespace)))

        async def running() -> bool:
            job = await cluster.get(job_res, "example-job", namespace)
            return (job.get("status") or {}).get("phase") == "Running"

        await _poll(running, "the example job to be Running")
        pods, _ = await cluster.list(PODS, namespace, f"{LABEL_JOB}=example-job")
        assert sorted(p["metadata"]["name"] for p in pods) == [
            "example-job-worker-0",
            "example-job-worker-1",
        ]
        assert all(p["status"]["phase"] == "Running" for p in pods)

        _kubectl("delete", "trainingjob.exabits.ai", "example-job", "-n", namespace, "--wait=false")

        async def gone() -> bool:
            try:
                await cluster.get(job_res, "example-job", namespace)
            except ApiError as exc:
                return exc.not_found
            return False

        await _poll(gone, "the finalizer to clean up and release the job")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        subprocess.run(
            ["kubectl", "delete", "namespace", namespace, "--wait=false"],
            capture_output=True,
            timeout=60,
        )
