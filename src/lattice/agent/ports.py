"""Port reservation for MASTER_PORT: held from join until the round's workers start.

Each round gets a port that nothing else holds (a bound, never-listening socket keeps the
kernel from handing it out), so a new round never meets a stale store of an earlier one.
"""

from __future__ import annotations

import socket


class PortReservation:
    """A free TCP port, held until `release()`."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("", 0))  # the wildcard address: the port is free on every interface
        self.port: int = self._sock.getsockname()[1]

    def release(self) -> None:
        """Let the worker that hosts the store bind the port (call right before spawning)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> PortReservation:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def free_port() -> int:
    """A TCP port free at this moment, for a server started on it next (tests, benchmarks)."""
    with PortReservation() as reservation:
        return reservation.port
