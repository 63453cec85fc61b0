"""Standalone mode: a rendezvous service inside the agent, on loopback, with a fresh token."""

from __future__ import annotations

from dataclasses import dataclass

from lattice.common.auth import new_admin_token
from lattice.common.http import BackgroundService


@dataclass
class EmbeddedRendezvous:
    """A running in-process rendezvous service (``lattice run`` without ``--rdzv-endpoint``)."""

    service: BackgroundService
    token: str

    @property
    def endpoint(self) -> str:
        return self.service.endpoint

    def stop(self) -> None:
        self.service.stop()


def start_embedded(settle_s: float, lease_s: float, rejoin_grace_s: float) -> EmbeddedRendezvous:
    from lattice.rendezvous.server import create_app

    token = new_admin_token()
    service = BackgroundService(
        lambda: create_app(token, settle_s=settle_s, lease_s=lease_s, rejoin_grace_s=rejoin_grace_s)
    )
    service.start()
    return EmbeddedRendezvous(service, token)
