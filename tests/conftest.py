"""Shared fixtures: an admin token and background services on loopback."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

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
        if key.startswith(("LATTICE_", "TORCHELASTIC_")) or key in {
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
        }:
            monkeypatch.delenv(key, raising=False)
    yield dict(os.environ)
