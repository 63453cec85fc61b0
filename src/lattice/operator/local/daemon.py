"""`lattice up` in the foreground: the control plane, its services and its API until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from aiohttp import web

from lattice.operator.local.api import create_app
from lattice.operator.local.plane import ControlPlane, PlaneConfig

log = logging.getLogger("lattice.local")


async def serve(config: PlaneConfig, host: str, port: int) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
    plane = ControlPlane(config)
    plane.start_services()
    runner = web.AppRunner(create_app(plane), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1] if site._server else port  # type: ignore[union-attr]
    endpoint_file = config.home / "endpoint"
    endpoint_file.write_text(f"{host}:{bound}\n")
    log.info(
        "lattice up: control plane on %s:%d, %d slots, home %s",
        host,
        bound,
        plane.slots,
        config.home,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(plane.run())
    try:
        await stop.wait()
    finally:
        log.info("lattice up: stopping (workers get %.0f s to checkpoint)", config.worker_grace_s)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await plane.shutdown()
        await runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            if endpoint_file.read_text().strip() == f"{host}:{bound}":
                os.unlink(endpoint_file)
