"""Fixtures for the agent's unit tests."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import pytest


@pytest.fixture
def reaper() -> Iterator[list[int]]:
    """Pids to SIGKILL after the test, whatever happened (processes it may have leaked)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
