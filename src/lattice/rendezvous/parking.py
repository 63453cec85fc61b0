"""Parked long-polls: requests that wait for a change and are all woken at once."""

from __future__ import annotations

import asyncio


class Lot:
    """Every parked request of one service, so shutdown can release them all."""

    def __init__(self) -> None:
        self.futures: set[asyncio.Future[None]] = set()
        self.closing = False

    def release_all(self) -> None:
        self.closing = True
        for fut in list(self.futures):
            if not fut.done():
                fut.set_result(None)


class Signal:
    """Requests parked on one thing (a node's round, a round's end, a job's KV)."""

    def __init__(self, lot: Lot) -> None:
        self._lot = lot
        self._futures: set[asyncio.Future[None]] = set()

    async def wait(self, timeout: float) -> None:
        """Return when fired, when ``timeout`` passes, or when the service shuts down."""
        if timeout <= 0 or self._lot.closing:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._futures.add(fut)
        self._lot.futures.add(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            self._futures.discard(fut)
            self._lot.futures.discard(fut)

    def fire(self) -> None:
        for fut in self._futures:
            if not fut.done():
                fut.set_result(None)
        self._futures.clear()
