"""Where the node-local checkpoint tier lives: shared memory only where there is room."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from lattice.common import node_local


def _shm_of(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, size: int) -> None:
    """Point the module at a stand-in /dev/shm of ``size`` bytes."""
    real = os.statvfs

    class Stats:
        f_frsize = 4096
        f_blocks = size // 4096

    monkeypatch.setattr(node_local, "SHM", tmp_path)
    monkeypatch.setattr(
        node_local.os, "statvfs", lambda p: Stats() if Path(p) == tmp_path else real(p)
    )


def test_a_containers_64_mib_shm_is_not_used(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(node_local.ENV_ROOT, raising=False)
    _shm_of(monkeypatch, tmp_path, 64 << 20)
    assert node_local.tier_root() == Path(tempfile.gettempdir()) / "lattice"
    note = node_local.small_shm_note()
    assert note is not None and "64 MiB, under 1 GiB" in note and node_local.ENV_ROOT in note


def test_a_memory_volume_at_shm_is_used(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(node_local.ENV_ROOT, raising=False)
    _shm_of(monkeypatch, tmp_path, 16 << 30)
    assert node_local.tier_root() == tmp_path / "lattice"
    assert node_local.small_shm_note() is None


def test_no_shm_at_all(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(node_local.ENV_ROOT, raising=False)
    monkeypatch.setattr(node_local, "SHM", tmp_path / "absent")
    assert node_local.tier_root() == Path(tempfile.gettempdir()) / "lattice"
    assert node_local.small_shm_note() is None  # nothing to say: there is none


def test_the_environment_decides_first(monkeypatch, tmp_path) -> None:
    _shm_of(monkeypatch, tmp_path, 16 << 30)
    assert node_local.tier_root({node_local.ENV_ROOT: "/data/tier"}) == Path("/data/tier")
    monkeypatch.setenv(node_local.ENV_ROOT, "/data/other")
    assert node_local.tier_root() == Path("/data/other")
    _shm_of(monkeypatch, tmp_path, 64 << 20)
    assert node_local.small_shm_note() is None  # the user chose
