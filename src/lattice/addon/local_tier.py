"""Node-local checkpoint tier: one directory per step, files written atomically with a checksum.

Layout: ``<dir>/step-<012d>/<name>.pt``; each file is ``sha256-hex`` + newline + payload, written
to a temporary name and renamed, so a reader sees either a whole file or none. A file whose
checksum does not match (bit flip, truncation) is rejected on read and the caller falls back to
an older step.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("lattice.addon")

PREFIX = "step-"


class CorruptFile(Exception):
    """A checkpoint file whose checksum or framing is wrong."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:012d}"


def write_file(path: Path, payload: bytes) -> None:
    """Write ``payload`` with its checksum header, atomically (temp + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256(payload).hexdigest().encode()
    with open(tmp, "wb") as fh:
        fh.write(digest + b"\n")
        fh.write(payload)
    os.replace(tmp, path)


def read_file(path: Path) -> bytes:
    """The payload of a checkpoint file; raises `CorruptFile` if the checksum does not match."""
    with open(path, "rb") as fh:  # header and payload read separately: no 2nd copy of the payload
        head = fh.readline()
        payload = fh.read()
    sep, head = head[-1:] == b"\n", head[:-1]
    if not sep or len(head) != 64:
        raise CorruptFile(f"{path}: no checksum header (truncated?)")
    if hashlib.sha256(payload).hexdigest().encode() != head:
        raise CorruptFile(f"{path}: checksum mismatch ({len(payload)} bytes)")
    return payload


def steps(root: Path) -> list[int]:
    """Steps that have a directory under ``root``, newest first."""
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(PREFIX) and entry.name[len(PREFIX) :].isdigit():
                found.append(int(entry.name[len(PREFIX) :]))
    return sorted(found, reverse=True)


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step directories."""
    for step in steps(root)[keep:]:
        shutil.rmtree(step_dir(root, step), ignore_errors=True)


def prune_step(root: Path, step: int) -> None:
    """Delete one step's directory (a newer, incomplete step left by a crash)."""
    shutil.rmtree(step_dir(root, step), ignore_errors=True)
