"""Validation of what names paths: job ids, steps and shard names (no traversal, no surprises)."""

from __future__ import annotations

import re

from lattice.common.http import valid_job_id

SHARD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_STEP = 10**12 - 1


def check_job(job: str) -> str:
    if not valid_job_id(job):
        raise ValueError(f"invalid job id {job!r}")
    return job


def check_step(step: int | str) -> int:
    text = str(step)
    if not text.isdigit() or len(text) > 12:
        raise ValueError(f"invalid step {text!r}: a non-negative integer below 10^12")
    return int(text)


def check_shard(name: str) -> str:
    if not SHARD_RE.fullmatch(name) or ".." in name:
        raise ValueError(
            f"invalid shard name {name!r}: letters, digits, '.', '_', '-' (max 128, no '..')"
        )
    return name
