"""Where a node keeps its jobs' node-local checkpoints (the addon's fast tier)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

ENV_ROOT = "LATTICE_LOCAL_ROOT"  # overrides the choice below
SHM = Path("/dev/shm")
# A container's /dev/shm is 64 MiB unless a memory volume is mounted there (the operator mounts
# one): too small for most checkpoints, and the checkpoint service's upload reads the files
# written there, so a full /dev/shm would leave a job with no checkpoint anywhere.
MIN_SHM_BYTES = 1 << 30


def tier_root(environ: Mapping[str, str] | None = None) -> Path:
    """``$LATTICE_LOCAL_ROOT``, else shared memory where the machine has at least
    `MIN_SHM_BYTES` of it (a restarted process restores at memory speed), else the temp dir."""
    env = os.environ if environ is None else environ
    if env.get(ENV_ROOT):
        return Path(env[ENV_ROOT])
    return (SHM if shm_usable() else Path(tempfile.gettempdir())) / "lattice"


def shm_usable() -> bool:
    return os.access(SHM, os.W_OK) and _shm_size() >= MIN_SHM_BYTES


def small_shm_note(environ: Mapping[str, str] | None = None) -> str | None:
    """Why the tier is on disk though the machine has a /dev/shm (it is too small)."""
    env = os.environ if environ is None else environ
    size = _shm_size()
    if env.get(ENV_ROOT) or not size or size >= MIN_SHM_BYTES:
        return None
    return (
        f"node-local checkpoints go to {tier_root(env)}, not {SHM}: it has {size >> 20} MiB, "
        f"under {MIN_SHM_BYTES >> 30} GiB (mount a memory volume there to restore at memory "
        f"speed, or set {ENV_ROOT})"
    )


def _shm_size() -> int:
    try:
        stats = os.statvfs(SHM)
    except OSError:
        return 0
    return stats.f_blocks * stats.f_frsize
