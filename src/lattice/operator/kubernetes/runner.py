"""`lattice operator` as a process: the HTTP endpoints, leader election and the controller.

``/healthz`` answers while the process serves; ``/readyz`` once the API server has answered
(a standby replica is ready too, so rolling updates proceed); ``/metrics`` is Prometheus.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiohttp import web

from lattice.common.auth import Authenticator
from lattice.common.http import make_app, registry_of
from lattice.operator.kubernetes.api import KubeApi
from lattice.operator.kubernetes.controller import Controller, OperatorConfig
from lattice.operator.kubernetes.leader import LeaderElector
from lattice.operator.kubernetes.metrics import OperatorMetrics
from lattice.operator.kubernetes.rendezvous import RendezvousView

log = logging.getLogger("lattice.operator.kubernetes")


@dataclass(frozen=True)
class LeaderConfig:
    """The Lease this operator's replicas compete for."""

    namespace: str
    name: str = "lattice-operator"
    lease_s: float = 15.0
    renew_deadline_s: float = 10.0
    renew_s: float = 2.0


class OperatorProcess:
    """Everything one operator replica runs; `serve()` until cancelled."""

    def __init__(
        self,
        api: KubeApi,
        config: OperatorConfig,
        *,
        leader: LeaderConfig | None,
        host: str = "0.0.0.0",
        port: int = 8080,
    ) -> None:
        self.api = api
        self.config = config
        self.host = host
        self.port = port
        self.app = make_app("operator", Authenticator(config.admin_token), ready=self.ready)
        self.metrics = OperatorMetrics(registry_of(self.app))
        self.rendezvous = RendezvousView(config.rendezvous_endpoint, config.admin_token)
        self.controller = Controller(api, config, metrics=self.metrics, rendezvous=self.rendezvous)
        self.checkpoints = self.controller.checkpoints
        self.elector = (
            LeaderElector(
                api,
                leader.namespace,
                leader.name,
                config.identity,
                lease_s=leader.lease_s,
                renew_deadline_s=leader.renew_deadline_s,
                renew_s=leader.renew_s,
                on_change=lambda leading: self.metrics.leader.set(1 if leading else 0),
            )
            if leader is not None
            else None
        )

    def ready(self) -> bool:
        if self.controller.synced:
            return True
        return self.elector is not None and self.elector.contacted and not self.elector.leading

    async def serve(self, started: asyncio.Event | None = None) -> None:
        runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        await site.start()
        server = site._server
        if server is not None and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        log.info(
            "operator %s: health and metrics on %s:%s", self.config.identity, self.host, self.port
        )
        if started is not None:
            started.set()
        try:
            if self.elector is None:
                self.metrics.leader.set(1)
                await self.controller.run()
            else:
                await self.elector.run(self.controller.run)
        finally:
            await self.rendezvous.close()
            if self.checkpoints is not None:
                await self.checkpoints.close()
            await runner.cleanup()
