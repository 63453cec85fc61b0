"""Helpers for the rendezvous integration tests: a restartable service, bounded waits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from lattice.common.http import BackgroundService
from lattice.rendezvous.client import RendezvousClient, Round
from lattice.rendezvous.server import create_app

DEADLINE_S = 60.0


class Service:
    """A BackgroundService running the rendezvous app; ``restart()`` keeps the port."""

    def __init__(self, token: str, **settings: Any) -> None:
        self.token = token
        self.settings = settings
        self._svc: BackgroundService | None = None
        self.port = 0

    def start(self) -> None:
        svc = BackgroundService(lambda: create_app(self.token, **self.settings), port=self.port)
        self.port = svc.start()
        self._svc = svc

    def stop(self) -> None:
        if self._svc is not None:
            self._svc.stop()
            self._svc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"


def join(
    c: RendezvousClient,
    *,
    nproc: int = 1,
    min_nodes: int = 1,
    max_nodes: int = 8,
    port: int = 29500,
    timeout: float | None = DEADLINE_S,
) -> Awaitable[Round]:
    return c.join(
        nproc=nproc,
        addr="127.0.0.1",
        port=port,
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        timeout=timeout,
    )


async def until(
    check: Callable[[], Awaitable[Any]], what: str, deadline_s: float = DEADLINE_S
) -> Any:
    """Poll ``check`` until it returns something truthy (bounded)."""
    end = time.monotonic() + deadline_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def bounded(aw: Awaitable[Any], deadline_s: float = DEADLINE_S) -> Any:
    return await asyncio.wait_for(aw, deadline_s)


def metric(svc: Service, name: str, labels: str = "") -> float:
    """One sample of the service's /metrics (0 if absent)."""
    text = httpx.get(f"{svc.url}/metrics").text
    prefix = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.split()[-1])
    return 0.0
