"""Fixtures: a real rendezvous service on loopback and real clients, always cleaned up."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # rdzv_testing (--import-mode=importlib)

from rdzv_testing import Service

from lattice.rendezvous.client import AdminClient, RendezvousClient


@pytest.fixture
def service_factory(admin_token: str) -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def make(**settings: Any) -> Service:
        svc = Service(admin_token, **settings)
        svc.start()
        started.append(svc)
        return svc

    yield make
    for svc in started:
        svc.stop()


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., RendezvousClient]]:
    """Make clients; all are closed at the end of the test."""
    made: list[RendezvousClient] = []

    def make(
        svc: Service, node_id: str, job: str = "job", token: str | None = None, **kw: Any
    ) -> RendezvousClient:
        c = RendezvousClient(svc.endpoint, job, node_id, token or svc.token, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()


@pytest.fixture
async def admin(
    service_factory: Callable[..., Service],
) -> AsyncIterator[Callable[[Service], AdminClient]]:
    made: list[AdminClient] = []

    def make(svc: Service) -> AdminClient:
        a = AdminClient(svc.endpoint, svc.token)
        made.append(a)
        return a

    yield make
    for a in made:
        await a.close()
