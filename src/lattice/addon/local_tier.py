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
import io
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
ROUND_FILE = "round"  # the rendezvous round that wrote a step (see `ranked`)
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
    if not path.stat().st_size:
        return digest(b"", threads)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            return digest(view, threads)
        finally:
            view.release()


def digest(data: Any, threads: int = READ_THREADS) -> str:
    """``<size> <scheme>:<hex>`` of a bytes-like ``data`` (what `checksum` says of its file)."""
    view = memoryview(data).cast("B")
    starts = range(0, len(view), CHUNK)

    def one(start: int) -> bytes:
        return hashlib.sha256(view[start : start + CHUNK]).digest()

    if threads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(min(threads, len(starts))) as pool:
            parts = list(pool.map(one, starts))
    else:
        parts = [one(start) for start in starts]
    return f"{len(view)} {SCHEME}:{hashlib.sha256(b''.join(parts)).hexdigest()}"


def save(path: Path, obj: Any) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically, then its checksum file."""
    tmp = _begin(path)
    try:
        # Through a file object: given a path, torch.save names the archive inside after the
        # file (ours has a pid in it), and two nodes' files of one state would differ in bytes.
        with open(tmp, "wb") as out:
            torch.save(obj, out)
        summary = checksum(tmp, WRITE_THREADS)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _record(path, summary)


def _begin(path: Path) -> Path:
    """A temporary name for a write of ``path``; an old checksum no longer vouches for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        _sum_path(path).unlink()
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _record(path: Path, summary: str) -> None:
    summed = _sum_path(path)
    tmp_sum = summed.with_name(f".{summed.name}.{os.getpid()}.tmp")
    tmp_sum.write_text(summary + "\n")
    os.replace(tmp_sum, summed)


def recorded(path: Path) -> str | None:
    """The checksum recorded for ``path`` (None while its write has not finished)."""
    try:
        return _sum_path(path).read_text().strip()
    except FileNotFoundError:
        return None


def _expected(path: Path) -> str:
    expected = recorded(path)
    if expected is None:
        raise CorruptFile(f"{path}: no checksum file (write not finished?)")
    return expected


def _check(path: Path, expected: str, actual: str) -> None:
    if actual != expected:
        raise CorruptFile(f"{path}: checksum mismatch ({actual.split()[0]} bytes)")


def verify(path: Path) -> None:
    """Raise `CorruptFile` unless ``path`` matches its checksum file."""
    _check(path, _expected(path), checksum(path))


def load(path: Path, mapped: bool = False) -> Any:
    """The verified contents of ``path``, loaded with ``weights_only=True`` onto the CPU.

    The checksum is computed while the file is read: ``torch.load`` maps the file (its sizes
    cannot make it allocate more than the file holds, even when corrupt) and the tensors are
    copied out of the mapping, so nothing keeps the file's pages once it is pruned; with
    ``mapped`` they stay in the mapping (for a caller that copies them into place at once and
    lets go: a second copy of a 300 MB piece file cost 0.29 s). Nothing loaded is returned
    unless the checksum matched.
    """
    expected = _expected(path)
    with ThreadPoolExecutor(1) as pool:
        summed = pool.submit(checksum, path)
        try:
            loaded = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
            obj, error = (loaded if mapped else state.detached_copy(loaded)), None
        except Exception as exc:  # a damaged file; the checksum says which error to report
            obj, error = None, exc
        _check(path, expected, summed.result())
    if error is not None:
        raise error
    return obj


def loads(data: Any, expected: str) -> Any:
    """`load` for a file's bytes received from elsewhere (a peer): verified, weights only."""
    _check(Path("<received>"), expected, digest(data))
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def store(path: Path, data: Any, expected: str) -> None:
    """Put a file's bytes received from elsewhere at ``path``, as `save` would have."""
    _check(path, expected, digest(data))
    tmp = _begin(path)
    try:
        tmp.write_bytes(memoryview(data).cast("B"))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _record(path, expected)


def steps(root: Path) -> list[int]:
    """Steps that have a directory under ``root``, newest first."""
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(PREFIX) and entry.name[len(PREFIX) :].isdigit():
                found.append(int(entry.name[len(PREFIX) :]))
    return sorted(found, reverse=True)


def prune(root: Path, keep: int, below: int | None = None) -> None:
    """Delete all but the newest ``keep`` step directories (of those before step ``below``:
    the ones from it on are left alone)."""
    for step in [s for s in steps(root) if below is None or s < below][keep:]:
        shutil.rmtree(step_dir(root, step), ignore_errors=True)


def prune_step(root: Path, step: int) -> None:
    """Delete one step's directory (a newer, incomplete step left by a crash)."""
    shutil.rmtree(step_dir(root, step), ignore_errors=True)


def mark_round(folder: Path, generation: int) -> None:
    """Record the rendezvous round that wrote ``folder``'s step (before its files are written)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ROUND_FILE).write_text(f"{generation}\n")


def round_of(folder: Path) -> int:
    """The round `mark_round` recorded; 0 when none was."""
    try:
        return int((folder / ROUND_FILE).read_text().strip())
    except (OSError, ValueError):
        return 0


Key = tuple[int, int]  # (round, step): the order of checkpoints across histories


def ranked(
    holdings: list[dict[int, tuple[str | None, int]]], newer_than: Key | None
) -> list[tuple[int, set[str], int]]:
    """The steps the ranks hold, best first, as (step, checksums of its finished files, round).

    Rounds are rendezvous generations, which only grow: a round that restored step R writes
    R + 1, R + 2, ... So a step from an older round with a higher number than a newer round's
    steps belongs to a history the newer round abandoned (a node that was away kept it) and
    comes after them. Steps older than the service's ``newer_than`` are left out.
    """
    found: dict[int, tuple[set[str], int]] = {}
    for held in holdings:
        for step, (summary, generation) in held.items():
            sums, best = found.get(step, (set(), 0))
            if summary:
                sums.add(summary)
            found[step] = (sums, max(best, generation))
    order = sorted(found, key=lambda st: (found[st][1], st), reverse=True)
    return [
        (st, found[st][0], found[st][1])
        for st in order
        if newer_than is None or (found[st][1], st) >= newer_than
    ]
