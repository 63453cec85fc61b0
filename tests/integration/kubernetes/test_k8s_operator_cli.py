"""`lattice operator` as a real process against the fake API server: one-line errors, a job
run in its namespace only, health and metrics, and a clean stop that hands the Lease back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fake_kube_api import FakeKube
from k8s_testing import job_manifest, until

from lattice.common.http import BackgroundService
from lattice.operator.core import LABEL_JOB

LATTICE = [sys.executable, "-m", "lattice"]
EXABITS = "exabits.ai/v1"


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LATTICE, "operator", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_operator_refuses_bad_invocations_in_one_line(
    clean_env: dict[str, str], tmp_path: Path, admin_token: str
) -> None:
    no_token = _run(["--kubeconfig", str(tmp_path / "none")], clean_env)
    assert no_token.returncode == 2
    assert no_token.stderr.strip().count("\n") == 0 and "LATTICE_TOKEN" in no_token.stderr

    env = {**clean_env, "LATTICE_TOKEN": admin_token}
    both = _run(["--namespace", "a", "--all-namespaces"], env)
    assert both.returncode == 2 and "exclude each other" in both.stderr

    missing = _run(["--kubeconfig", str(tmp_path / "none")], env)
    assert missing.returncode == 2
    assert "no Kubernetes cluster configured" in missing.stderr
    assert "Traceback" not in missing.stderr + no_token.stderr + both.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def operator_process(
    kube: FakeKube,
    kubeconfig: Path,
    rendezvous: BackgroundService,
    clean_env: dict[str, str],
    admin_token: str,
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    port = _free_port()
    env = {**clean_env, "LATTICE_TOKEN": admin_token, "KUBECONFIG": str(kubeconfig)}
    proc = await asyncio.create_subprocess_exec(
        *LATTICE,
        "operator",
        "--namespace",
        "team",
        "--rendezvous-endpoint",
        rendezvous.endpoint,
        "--metrics-host",
        "127.0.0.1",
        "--metrics-port",
        str(port),
        "--lease-namespace",
        "lattice-system",
        "--identity",
        "cli-operator",
        "--resync",
        "1",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    yield proc, port
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


async def test_operator_process_runs_jobs_serves_health_and_stops_cleanly(
    kube: FakeKube, operator_process: tuple[asyncio.subprocess.Process, int]
) -> None:
    proc, port = operator_process
    kube.add_node("node-0", {"pods": "4"})
    kube.create(EXABITS, "trainingjobs", job_manifest("mine", min_size=2, max_size=2))
    kube.create(EXABITS, "trainingjobs", job_manifest("theirs", namespace="elsewhere"))

    def phase() -> str:
        job = kube.get(EXABITS, "trainingjobs", "team", "mine") or {}
        return str((job.get("status") or {}).get("phase"))

    await until(lambda: phase() == "Running", what="the job Running", timeout=90)
    assert len(kube.pods("team", f"{LABEL_JOB}=mine")) == 2
    assert kube.pods("elsewhere") == []  # --namespace team: other namespaces are not touched
    assert "status" not in (kube.get(EXABITS, "trainingjobs", "elsewhere", "theirs") or {})

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 200
        metrics = (await http.get("/metrics")).text
    assert "lattice_operator_leader 1.0" in metrics
    assert 'lattice_operator_jobs{phase="Running"} 1.0' in metrics

    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(60):
        assert await proc.wait() == 0
    lease = kube.get("coordination.k8s.io/v1", "leases", "lattice-system", "lattice-operator")
    assert lease is not None and lease["spec"]["holderIdentity"] == ""  # handed back
