"""The operator's bounded view of the rendezvous service: each job's round, and its target.

A slow or absent rendezvous service must never stall the reconcile cycle (pods still get
created and replaced), so every call has a short deadline and failures read as "unknown".
Deadlines use ``asyncio.timeout``: ``wait_for`` on Python 3.11 can lose a cancellation.
"""

from __future__ import annotations

import asyncio
import logging

from lattice.common.errors import UserError
from lattice.operator.core import RoundInfo
from lattice.rendezvous.client import AdminClient

log = logging.getLogger("lattice.operator.kubernetes")
DEFAULT_TIMEOUT_S = 5.0


class RendezvousView:
    """`observe` a job's round and target; `set_target` (None: back to the settle rule)."""

    def __init__(self, endpoint: str, token: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.endpoint = endpoint
        self._client = AdminClient(endpoint, token)
        self._timeout_s = timeout_s
        self._warned = False
        self.failures = 0

    def _failed(self, what: str, exc: BaseException) -> None:
        self.failures += 1
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        log.log(level, "rendezvous service at %s: %s failed: %s", self.endpoint, what, exc)

    async def observe(self, job_id: str) -> tuple[RoundInfo | None, int | None]:
        """The job's current round (size 0 between rounds) and the target the service holds."""
        try:
            async with asyncio.timeout(self._timeout_s):
                data = await self._client.job_status(job_id)
        except (UserError, TimeoutError, OSError, ValueError) as exc:
            self._failed(f"status of {job_id}", exc)
            return None, None
        self._warned = False
        generation = data.get("generation")
        target = data.get("target")
        if generation is None:
            return None, target if isinstance(target, int) else None
        size = len(data.get("members") or []) if data.get("running") else 0
        failed = data.get("failed_rounds")
        last = data.get("last_failure")
        info = RoundInfo(
            int(generation),
            size,
            failed_rounds=failed if isinstance(failed, int) else None,
            last_failure=last if isinstance(last, str) else None,
        )
        return info, target if isinstance(target, int) else None

    async def set_target(self, job_id: str, size: int | None) -> bool:
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._client.set_target(job_id, size)
        except (UserError, TimeoutError, OSError, ValueError) as exc:
            self._failed(f"setting the target of {job_id} to {size}", exc)
            return False
        return True

    async def close(self) -> None:
        await self._client.close()
