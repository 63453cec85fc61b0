"""Node-local checkpoint tier: one directory per step, files written atomically with a checksum.

Layout: ``<dir>/step-<012d>/<name>.pt`` (a plain ``torch.save`` file) and ``<name>.pt.sha256``
beside it (its size and checksum). The data is written to a temporary name and renamed, then the
checksum file; a reader takes a file only when its checksum file is there and matches, so a
torn write, a bit flip or a truncation is rejected and the caller falls back to an older step.

The checksum is a SHA-256 over the SHA-256s of 16 MiB chunks, computed by several threads
(hashlib releases the GIL): a 600 MB state verifies in a fraction of the time one stream
takes, and while the file is loaded by ``torch.load`` from its path.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from lattice.addon import state

log = logging.getLogger("lattice.addon")

PREFIX = "step-"
CHUNK = 16 << 20
SUM_SUFFIX = ".sha256"
SCHEME = f"sha256-tree-{CHUNK}"
WRITE_THREADS = 2  # the write runs beside training: leave it the cores
READ_THREADS = min(8, os.cpu_count() or 1)  # restore is on the critical path


class CorruptFile(Exception):
    """A checkpoint file whose checksum is missing or wrong."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:012d}"


def _sum_path(path: Path) -> Path:
    return path.with_name(path.name + SUM_SUFFIX)


def checksum(path: Path, threads: int = READ_THREADS) -> str:
    """``<size> <scheme>:<hex>`` of the file at ``path``."""
    size = path.stat().st_size
    parts: list[bytes] = []
    if size:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                starts = range(0, size, CHUNK)

                def one(start: int) -> bytes:
                    return hashlib.sha256(view[start : start + CHUNK]).digest()

                if threads > 1 and len(starts) > 1:
                    with ThreadPoolExecutor(min(threads, len(starts))) as pool:
                        parts = list(pool.map(one, starts))
                else:
                    parts = [one(start) for start in starts]
            finally:
                view.release()
    return f"{size} {SCHEME}:{hashlib.sha256(b''.join(parts)).hexdigest()}"


def save(path: Path, obj: Any) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically, then its checksum file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    summed = _sum_path(path)
    with contextlib.suppress(FileNotFoundError):
        summed.unlink()  # a rewrite: the old checksum must not vouch for the new data
    try:
        torch.save(obj, tmp)
        digest = checksum(tmp, WRITE_THREADS)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp_sum = summed.with_name(f".{summed.name}.{os.getpid()}.tmp")
    tmp_sum.write_text(digest + "\n")
    os.replace(tmp_sum, summed)


def _expected(path: Path) -> str:
    try:
        return _sum_path(path).read_text().strip()
    except FileNotFoundError:
        raise CorruptFile(f"{path}: no checksum file (write not finished?)") from None


def _check(path: Path, expected: str, actual: str) -> None:
    if actual != expected:
        raise CorruptFile(f"{path}: checksum mismatch ({actual.split()[0]} bytes)")


def verify(path: Path) -> None:
    """Raise `CorruptFile` unless ``path`` matches its checksum file."""
    _check(path, _expected(path), checksum(path))


def load(path: Path) -> Any:
    """The verified contents of ``path``, loaded with ``weights_only=True`` onto the CPU.

    The checksum is computed while the file is read: ``torch.load`` maps the file (its sizes
    cannot make it allocate more than the file holds, even when corrupt) and the tensors are
    copied out of the mapping, so nothing keeps the file's pages once it is pruned. Nothing
    loaded is returned unless the checksum matched.
    """
    expected = _expected(path)
    with ThreadPoolExecutor(1) as pool:
        summed = pool.submit(checksum, path)
        try:
            mapped = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
            obj, error = state.detached_copy(mapped), None
        except Exception as exc:  # a damaged file; the checksum says which error to report
            obj, error = None, exc
        _check(path, expected, summed.result())
    if error is not None:
        raise error
    return obj


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
