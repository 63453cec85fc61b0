"""Process helpers for the agent's tests: liveness that treats zombies as dead, bounded waits."""

from __future__ import annotations

import time
from collections.abc import Callable


def alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie waiting to be reaped is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(cond: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()
