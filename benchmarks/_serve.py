"""Starting a Lattice service for a benchmark: wait, bounded, until it answers."""

from __future__ import annotations

import subprocess
import time

import httpx


def wait_ready(url: str, proc: subprocess.Popen[bytes], what: str, bound_s: float = 60.0) -> None:
    """Return once ``url`` answers 200; raise if ``proc`` exits or ``bound_s`` runs out."""
    deadline = time.monotonic() + bound_s
    while True:
        try:
            if httpx.get(url).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start in {bound_s:.0f} s")
        time.sleep(0.05)
