"""Shared fixtures: an admin token and background services on loopback."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lattice.common import node_local
from lattice.common.auth import new_admin_token

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
LATTICE = [PYTHON, "-m", "lattice"]


@pytest.fixture
def admin_token() -> str:
    return new_admin_token()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """An environment without Lattice/torchelastic variables leaking in from the caller."""
    for key in list(os.environ):
        if key == node_local.ENV_ROOT:  # the machine's, like TMPDIR (a second session's own)
            continue
        if key.startswith(("LATTICE_", "TORCHELASTIC_")) or key in {
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
        }:
            monkeypatch.delenv(key, raising=False)
    yield dict(os.environ)


@pytest.fixture(autouse=True)
def _no_node_local_checkpoints_left() -> Iterator[None]:
    """Remove the node-local checkpoint dirs (memory, in /dev/shm) a test's jobs left behind.

    Jobs that fail or are killed keep them on purpose (a restarted job restores from there);
    between tests they would leak memory and let a later test with the same job id restore
    an earlier test's state.
    """
    root = node_local.tier_root()
    before = set(root.iterdir()) if root.is_dir() else set()
    yield
    for path in (set(root.iterdir()) if root.is_dir() else set()) - before:
        shutil.rmtree(path, ignore_errors=True)
