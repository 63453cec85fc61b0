"""Fixtures: the fake Kubernetes API server, a real rendezvous service, and operators wired
to them over loopback HTTP; everything is stopped at the end of each test."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

# The helper modules next to this file (importable under any pytest import mode).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_kube_api import FakeKube
from k8s_testing import Operators

from lattice.checkpoint.server import create_app as checkpoint_app
from lattice.common.http import BackgroundService
from lattice.operator.core import ReconcileConfig
from lattice.operator.kubernetes import PERMISSIONS, OperatorConfig
from lattice.rendezvous.server import create_app


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    server = FakeKube()
    await server.start()
    yield server
    await server.stop()
    # Every verb the operator used is one it declares (and so one the RBAC grants).
    declared = {(v, r.group, r.rbac_name) for r, verbs in PERMISSIONS.items() for v in verbs}
    assert server.used() <= declared, f"undeclared API calls: {server.used() - declared}"


@pytest.fixture
def kubeconfig(kube: FakeKube, tmp_path: Path) -> Path:
    return kube.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def rendezvous(admin_token: str) -> Iterator[BackgroundService]:
    service = BackgroundService(lambda: create_app(admin_token, settle_s=0.2, lease_s=2.0))
    service.start()
    yield service
    service.stop()


@pytest.fixture
def checkpoint_service(admin_token: str, tmp_path: Path) -> Iterator[BackgroundService]:
    data = tmp_path / "checkpoints"
    service = BackgroundService(lambda: checkpoint_app(admin_token, str(data)))
    service.start()
    yield service
    service.stop()


@pytest.fixture
async def operators(
    kubeconfig: Path,
    rendezvous: BackgroundService,
    checkpoint_service: BackgroundService,
    admin_token: str,
) -> AsyncIterator[Operators]:
    base = OperatorConfig(
        admin_token=admin_token,
        rendezvous_endpoint=rendezvous.endpoint,
        checkpoint_endpoint=checkpoint_service.endpoint,
        identity="operator-a",
        resync_s=2.0,
        debounce_s=0.02,
        resize_cooldown_s=0.0,
        reconcile=ReconcileConfig(unschedulable_timeout_s=600.0),
    )
    ops = Operators(kubeconfig, base)
    yield ops
    await ops.stop_all()
