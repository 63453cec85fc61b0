"""Leader election on a coordination.k8s.io Lease, the way client-go does it.

Only the replica holding the Lease reconciles. A holder renews every ``renew_s``; if it cannot
renew within ``renew_deadline_s`` it stops leading at once (before its lease can expire for
the others). A candidate takes over a Lease whose record has not changed for its
``leaseDurationSeconds``, measured on the candidate's own clock (no clock-skew trust in the
record's timestamps). Updates carry the resourceVersion, so two candidates cannot both win.
On a clean shutdown the holder releases the Lease, so a successor starts at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from lattice.operator.kubernetes.api import ApiError, KubeApi
from lattice.operator.kubernetes.resources import LEASES

log = logging.getLogger("lattice.operator.kubernetes")
Obj = dict[str, Any]


def micro_time(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Campaigns for the Lease ``namespace/name`` and runs ``lead()`` while holding it."""

    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_s: float = 15.0,
        renew_deadline_s: float = 10.0,
        renew_s: float = 2.0,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        if not 0 < renew_s < renew_deadline_s < lease_s:
            raise ValueError("need 0 < renew_s < renew_deadline_s < lease_s")
        self.api = api
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_s = lease_s
        self.renew_deadline_s = renew_deadline_s
        self.renew_s = renew_s
        self.leading = False
        self.contacted = False  # the API server answered at least once
        self._on_change = on_change
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0

    def _set_leading(self, value: bool) -> None:
        if value != self.leading:
            self.leading = value
            log.info(
                "%s %s the lease %s/%s",
                self.identity,
                "acquired" if value else "lost",
                self.namespace,
                self.name,
            )
            if self._on_change is not None:
                self._on_change(value)

    async def run(self, lead: Callable[[], Awaitable[None]]) -> None:
        """Campaign, lead, and campaign again after losing the lease; returns when ``lead``
        returns; releases the lease when cancelled while leading."""
        while True:
            while not await self.try_acquire_or_renew():
                await asyncio.sleep(self.renew_s)
            self._set_leading(True)
            task = asyncio.create_task(lead())
            try:
                lost = await self._hold(task)
            except asyncio.CancelledError:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await self.release()
                raise
            finally:
                self._set_leading(False)
            if not lost:
                await self.release()
                task.result()  # re-raise what ended the leader's work
                return
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _hold(self, task: asyncio.Task[None]) -> bool:
        """Renew until the lease is lost (True) or ``task`` ends (False)."""
        last_renew = time.monotonic()
        while True:
            done, _ = await asyncio.wait({task}, timeout=self.renew_s)
            if done:
                return False
            if await self.try_acquire_or_renew():
                last_renew = time.monotonic()
            elif time.monotonic() - last_renew >= self.renew_deadline_s:
                return True

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True if this replica holds the lease afterwards."""
        now = time.time()
        try:
            lease = await self.api.get(LEASES, self.name, self.namespace)
        except ApiError as exc:
            if not exc.not_found:
                log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
                return False
            self.contacted = True
            return await self._create(now)
        self.contacted = True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"))
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        duration = float(spec.get("leaseDurationSeconds") or self.lease_s)
        if holder and holder != self.identity and time.monotonic() < self._observed_at + duration:
            return False
        transitions = int(spec.get("leaseTransitions") or 0)
        new_spec: Obj = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.lease_s),
            "acquireTime": spec.get("acquireTime") if holder == self.identity else micro_time(now),
            "renewTime": micro_time(now),
            "leaseTransitions": transitions if holder == self.identity else transitions + 1,
        }
        try:
            await self.api.replace(LEASES, {**lease, "spec": new_spec})
        except ApiError as exc:
            if not exc.conflict:
                log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
            return False
        return True

    async def _create(self, now: float) -> bool:
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": int(self.lease_s),
                "acquireTime": micro_time(now),
                "renewTime": micro_time(now),
                "leaseTransitions": 0,
            },
        }
        try:
            await self.api.create(LEASES, lease)
        except ApiError as exc:
            if not exc.already_exists:
                log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
            return False
        return True

    async def release(self) -> None:
        """Give the lease up (if still ours) so another replica takes over at once."""
        try:
            lease = await self.api.get(LEASES, self.name, self.namespace)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            now = micro_time(time.time())
            released = {
                **spec,
                "holderIdentity": "",
                "leaseDurationSeconds": 1,
                "renewTime": now,
                "acquireTime": now,
            }
            await self.api.replace(LEASES, {**lease, "spec": released})
        except ApiError as exc:
            log.warning("lease %s/%s not released: %s", self.namespace, self.name, exc)
