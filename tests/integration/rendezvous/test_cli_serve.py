"""`lattice rendezvous serve` as a real process: refusing to start, serving, surviving kill -9."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from rdzv_testing import bounded, join, until

from lattice.rendezvous.client import AdminClient, RendezvousClient

LATTICE = [sys.executable, "-m", "lattice"]


def test_serve_without_token_is_one_line_error(clean_env: dict[str, str]) -> None:
    done = subprocess.run(
        [*LATTICE, "rendezvous", "serve", "--port", "0"],
        env=clean_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--token" in lines[0] and "LATTICE_TOKEN" in lines[0]
    assert "Traceback" not in done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server:
    def __init__(self, env: dict[str, str], port: int) -> None:
        self.env, self.port = env, port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *LATTICE,
                "rendezvous",
                "serve",
                "--port",
                str(self.port),
                "--settle",
                "600",
                "--lease",
                "2",
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()


@pytest.fixture
def server(clean_env: dict[str, str], admin_token: str) -> Iterator[_Server]:
    env = {**clean_env, "LATTICE_TOKEN": admin_token}
    srv = _Server(env, _free_port())
    srv.start()
    yield srv
    srv.kill()


async def _ready(port: int) -> bool:
    try:
        async with httpx.AsyncClient() as http:
            return (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
    except httpx.TransportError:
        return False


async def test_served_round_survives_kill_9_and_restart(server: _Server, admin_token: str) -> None:
    endpoint = f"127.0.0.1:{server.port}"
    await until(lambda: _ready(server.port), "the service to listen")
    a = RendezvousClient(endpoint, "job", "a", admin_token)
    b = RendezvousClient(endpoint, "job", "b", admin_token)
    adm = AdminClient(endpoint, admin_token)
    try:
        rounds = await bounded(asyncio.gather(join(a, max_nodes=2), join(b, max_nodes=2)))
        gen = rounds[0].generation
        ends = [asyncio.ensure_future(c.wait_round_end(gen)) for c in (a, b)]
        server.kill()
        server.start()  # same port, a new process with empty state

        async def adopted() -> bool:
            if not await _ready(server.port):
                return False
            status = await adm.job_status("job")
            return status["running"] and status["generation"] == gen

        await until(adopted, "the clients to re-register their round")
        assert not any(e.done() for e in ends)
        await a.leave()
        end = await bounded(ends[1])
        assert (end.generation, end.reason) == (gen, "left")
    finally:
        for c in (a, b):
            await c.close()
        await adm.close()
