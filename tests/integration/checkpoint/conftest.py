"""A real checkpoint service on loopback over a temporary directory."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lattice.checkpoint.client import CheckpointClient
from lattice.checkpoint.server import create_app
from lattice.common.auth import job_token
from lattice.common.http import BackgroundService


@dataclass
class Service:
    endpoint: str
    token: str
    data: Path

    def client(self, job: str = "job-a", token: str | None = None) -> CheckpointClient:
        return CheckpointClient(
            self.endpoint, job, token or job_token(self.token, job), retry_for=2.0
        )


@pytest.fixture
def ckpt_service(tmp_path: Path, admin_token: str) -> Iterator[Service]:
    data = tmp_path / "data"
    svc = BackgroundService(lambda: create_app(admin_token, str(data), keep=3))
    svc.start()
    try:
        yield Service(svc.endpoint, admin_token, data)
    finally:
        svc.stop()
