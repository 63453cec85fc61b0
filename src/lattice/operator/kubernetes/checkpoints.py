"""The operator's bounded view of the checkpoint service: each job's latest commit, for
``status.lastCheckpoint``. Like the rendezvous view, a slow or absent service reads as
"unknown" and never stalls the reconcile cycle."""

from __future__ import annotations

import asyncio
import logging

import httpx

from lattice.operator.core import CheckpointInfo

log = logging.getLogger("lattice.operator.kubernetes")
DEFAULT_TIMEOUT_S = 5.0


class CheckpointView:
    """``latest(job_id)``: the newest committed checkpoint (admin token, read only)."""

    def __init__(self, endpoint: str, token: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        base = endpoint if "://" in endpoint else f"http://{endpoint}"
        self.endpoint = endpoint
        self._timeout_s = timeout_s
        self._http = httpx.AsyncClient(
            base_url=base.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout_s,
            trust_env=False,
        )
        self._warned = False

    async def latest(self, job_id: str) -> CheckpointInfo | None:
        try:
            async with asyncio.timeout(self._timeout_s):
                response = await self._http.get(f"/v1/jobs/{job_id}/checkpoints")
            if response.status_code == 404:
                return None
            response.raise_for_status()
            newest = (response.json().get("checkpoints") or [None])[0]
        except (httpx.HTTPError, TimeoutError, ValueError, AttributeError) as exc:
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(level, "checkpoint service at %s: %s", self.endpoint, exc)
            return None
        self._warned = False
        if not isinstance(newest, dict) or not isinstance(newest.get("step"), int):
            return None
        created = newest.get("created")
        return CheckpointInfo(
            step=newest["step"], time=float(created) if isinstance(created, int | float) else None
        )

    async def close(self) -> None:
        await self._http.aclose()
