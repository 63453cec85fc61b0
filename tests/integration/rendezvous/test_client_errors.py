"""What the client says when the service is missing or a round does not form in time."""

from __future__ import annotations

import socket

import pytest
from rdzv_testing import bounded, join

from lattice.rendezvous.client import RendezvousClient
from lattice.rendezvous.errors import RendezvousTimeout, RendezvousUnreachable


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens here once the socket closes


async def test_unreachable_after_retrying_says_how_to_fix() -> None:
    port = _closed_port()
    client = RendezvousClient(f"127.0.0.1:{port}", "job", "n0", "t", unreachable_after=0.5)
    try:
        with pytest.raises(RendezvousUnreachable) as info:
            await bounded(join(client))
    finally:
        await client.close()
    message = str(info.value)
    assert f"127.0.0.1:{port} is not reachable" in message
    assert "lattice rendezvous serve" in message and "--rdzv-endpoint" in message


async def test_join_timeout_raises_and_withdraws(service_factory, clients, admin) -> None:
    svc = service_factory(settle_s=0.0)
    lonely = clients(svc, "lonely")
    with pytest.raises(RendezvousTimeout, match="fewer than 2") as info:
        await bounded(join(lonely, min_nodes=2, timeout=0.3))
    assert isinstance(info.value, TimeoutError)  # the agent catches the builtin
    assert (await admin(svc).job_status("job"))["waiting"] == []
