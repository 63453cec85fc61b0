"""Saving the last finished step from a process whose next step failed.

When a rank dies (kill -9, a crash), the others fail inside the step in flight: gloo sees the
peer's socket close during the gradient all-reduce and raises within milliseconds. Their model
and optimizer still hold the state of the last finished step, since only ``optimizer.step``
changes them, so saving that state then makes a kill -9 lose only the step in flight, whatever
the checkpoint interval (just-in-time checkpointing, Gupta et al., EuroSys '24).

What the failed step did change is taken from a `Boundary` kept at each step boundary: the
loaders' positions, the script's counters, and versions to prove that nothing else moved
(BatchNorm running statistics, a scheduler stepped early). Each rank's RNG state also goes to
a node-local `RngRecords` file at every boundary (a few kilobytes, two alternating slots with a
CRC): the rank that died left its own there for its restart, on its node; with it, at a
boundary right after an update, the script's small CPU batch tensors (script_tensors.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import pickle
import random
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.modules.batchnorm import _NormBase

from lattice.addon import local_tier

try:
    import numpy as np
except ImportError:  # numpy is optional for training scripts
    np = None  # type: ignore[assignment]

KEY = "failed_step"  # marks a state file saved this way: its RNG states are in `RNG_FILE`s
RNG_DIR = "rng"  # under the node-local root: each rank's record of its last boundary
RNG_FILE = "rngs.pt"  # in a step's folder: every old rank's record, once a restore gathered them
_MAGIC = b"LRN3"  # a record's payload: `join_record` (3: with streams' states)
_HEAD = struct.Struct("<4sII")  # magic, crc32 of the body, body length
_META = struct.Struct("<qqii?")  # generation, step, rank, world, exact
_PY_WORDS = struct.Struct("<625I")  # random's Mersenne Twister: 624 words and the index
_TWISTER = 625 * 4  # numpy's in place: 624 uint32 words and an int position


@dataclass
class Boundary:
    """What a checkpoint taken at the last step boundary would have held beside the tensors."""

    step: int
    generation: int
    world: int
    positions: list[Any]  # data.Position of each tracked loader
    loops: list[dict[str, Any]]
    schedulers: list[int] = field(default_factory=list)  # each scheduler's last_epoch
    versions: list[int] = field(default_factory=list)  # see `versions`
    optimizer_steps: int = 0  # steps taken by all optimizers, the first one's included
    # Kept at an optimizer-hook boundary (a script without a DataLoader: the boundary is right
    # after the update, before the script's scheduler step and scaler update), with the
    # schedulers' and scalers' states as they were then, saved in place of their live ones.
    after_update: bool = False
    states: dict[str, Any] = field(default_factory=dict)


def versions(
    averaged: list[torch.nn.Module], scalers: list[Any], tensors: Sequence[torch.Tensor] = ()
) -> list[int]:
    """In-place version counters of what a step may change outside ``optimizer.step`` and the
    models' buffers (`BufferCopies`): averaged models, other copies (an EMA's ``tensors``),
    and a grad scaler's scale (its ``update`` after a step it skipped for inf gradients)."""
    found = [t._version for m in averaged for t in (*m.parameters(), *m.buffers())]
    found += [t._version for t in tensors]
    for scaler in scalers:
        for name in ("_scale", "_growth_tracker"):
            t = getattr(scaler, name, None)
            found.append(-1 if t is None else t._version)
    return found


def buffers(modules: list[torch.nn.Module]) -> list[tuple[torch.Tensor, bool]]:
    """The models' buffers, each with whether its version counter cannot be trusted: the
    running statistics of a norm layer, which its kernel updates without bumping it."""
    found = []
    for top in modules:
        for module in top.modules():
            silent = isinstance(module, _NormBase)
            found += [(b, silent) for b in module._buffers.values() if b is not None]
    return found


class BufferCopies:
    """The models' buffers as of the last boundary: a forward pass writes some in place
    (BatchNorm's running statistics), so a failed step's forward has moved them. A buffer is
    copied again when its version counter moved, and a norm layer's at every boundary (its
    kernel does not bump theirs); a constant (a mask, a table) is copied once."""

    def __init__(self) -> None:
        self.live: list[torch.Tensor] = []  # held: an id is reused once its tensor is freed
        self.copies: list[torch.Tensor] = []
        self.versions: list[int] = []

    def keep(self, live: list[tuple[torch.Tensor, bool]]) -> None:
        if not self._same(live):
            self.live = [b for b, _ in live]
            self.copies = [b.detach().clone() for b in self.live]
            self.versions = [b._version for b in self.live]
            return
        moved = [
            i for i, (b, silent) in enumerate(live) if silent or b._version != self.versions[i]
        ]
        if moved:
            torch._foreach_copy_([self.copies[i] for i in moved], [self.live[i] for i in moved])
            for i in moved:
                self.versions[i] = self.live[i]._version

    def by_identity(self, live: list[tuple[torch.Tensor, bool]]) -> dict[int, torch.Tensor] | None:
        """id of each live buffer → its copy; None if the buffers are not the kept ones."""
        if not self._same(live):
            return None
        return {id(b): c for b, c in zip(self.live, self.copies, strict=True)}

    def _same(self, live: list[tuple[torch.Tensor, bool]]) -> bool:
        return len(live) == len(self.live) and all(
            a is b for (a, _), b in zip(live, self.live, strict=True)
        )


# RNG records -----------------------------------------------------------------------------
class _NumpyPart:
    """numpy's part of `pack_rng`. ``np.random.get_state`` copies the state (30 µs, half of a
    pack); the Mersenne Twister's words and position, read in place (1 µs), tell when the last
    copy still holds: the same words and no cached gaussian (taking a gaussian from the cache
    moves no word). Most scripts never draw from numpy's global generator at all."""

    def __init__(self) -> None:
        self.address: int | None = None
        self.checked = False
        self.words = b""  # in place when `packed` was taken; empty: take it again
        self.packed = b""

    def part(self) -> bytes:
        if not self.checked:
            self.checked, self.address = True, _twister_address()
        address = self.address  # words are only taken where there is one
        if address is not None and self.words and ctypes.string_at(address, _TWISTER) == self.words:
            return self.packed
        _kind, keys, pos, has_gauss, cached = np.random.get_state()
        packed = struct.pack("<i?i?d", 1, True, pos, bool(has_gauss), cached) + keys.tobytes()
        if self.address is not None:
            self.packed = packed
            self.words = b"" if has_gauss else ctypes.string_at(self.address, _TWISTER)
        return packed


def _twister_address() -> int | None:
    """Where numpy's global generator keeps its 624 words and position (``mt19937_state``),
    if its layout is the one expected (checked against ``get_state``); None otherwise."""
    try:
        address = int(np.random.mtrand._rand._bit_generator.ctypes.state_address)
    except (AttributeError, TypeError):
        return None
    _kind, keys, pos, _has_gauss, _cached = np.random.get_state()
    expected = keys.astype("<u4").tobytes() + struct.pack("<i", pos)
    return address if ctypes.string_at(address, len(expected)) == expected else None


_NUMPY = _NumpyPart()


def pack_rng() -> bytes:
    """This process's RNG states (python, numpy, torch, CUDA), in a few microseconds."""
    version, internal, gauss = random.getstate()
    parts = [
        struct.pack("<i?d", version, gauss is not None, gauss or 0.0),
        _PY_WORDS.pack(*internal),
        torch.get_rng_state().numpy().tobytes(),
    ]
    if np is not None:
        parts.append(_NUMPY.part())
    else:
        parts.append(struct.pack("<i?i?d", 0, False, 0, False, 0.0))
    cuda: list[torch.Tensor] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    parts.append(struct.pack("<i", len(cuda)))
    for t in cuda:
        raw = t.numpy().tobytes()
        parts += [struct.pack("<i", len(raw)), raw]
    return b"".join(parts)


def unpack_rng(blob: bytes) -> dict[str, Any]:
    """`pack_rng`'s bytes as `state.capture_rng`'s dict (what `state.restore_rng` takes)."""
    view = memoryview(blob)
    version, has_gauss, gauss = struct.unpack_from("<i?d", view, 0)
    at = struct.calcsize("<i?d")
    internal = list(_PY_WORDS.unpack_from(view, at))
    at += _PY_WORDS.size
    n_torch = torch.get_rng_state().numel()
    cpu = torch.frombuffer(bytearray(view[at : at + n_torch]), dtype=torch.uint8)
    at += n_torch
    rng: dict[str, Any] = {"python": [version, internal, gauss if has_gauss else None]}
    rng["torch"] = cpu
    has_np, _, pos, np_gauss, cached = struct.unpack_from("<i?i?d", view, at)
    at += struct.calcsize("<i?i?d")
    if has_np:
        keys = torch.frombuffer(bytearray(view[at : at + 624 * 4]), dtype=torch.int32)
        keys = keys.to(torch.int64) & 0xFFFFFFFF
        at += 624 * 4
        rng["numpy"] = ["MT19937", keys, pos, int(np_gauss), cached]
    (n_cuda,) = struct.unpack_from("<i", view, at)
    at += 4
    if n_cuda:
        states = []
        for _ in range(n_cuda):
            (size,) = struct.unpack_from("<i", view, at)
            at += 4
            states.append(torch.frombuffer(bytearray(view[at : at + size]), dtype=torch.uint8))
            at += size
        rng["cuda"] = states
    return rng


_RNG_LENGTH = struct.Struct("<I")


def join_record(rng: bytes, tensors: bytes = b"", streams: bytes = b"") -> bytes:
    """A record's payload: this rank's `pack_rng` bytes, its script tensors' and its streams'
    states (`encode_streams`; either may be empty)."""
    return _RNG_LENGTH.pack(len(rng)) + rng + _RNG_LENGTH.pack(len(tensors)) + tensors + streams


def split_record(payload: bytes) -> tuple[bytes, bytes, bytes]:
    """`join_record`'s parts: (RNG state, script tensors, streams' states)."""
    parts, at = [], 0
    for _ in range(2):
        (length,) = _RNG_LENGTH.unpack_from(payload, at)
        at += _RNG_LENGTH.size
        parts.append(payload[at : at + length])
        at += length
    return parts[0], parts[1], payload[at:]


def encode_streams(states: list[Any]) -> bytes:
    """Each tracked loader's stream state (`data.stream_state`; None for others) as bytes for
    a record; empty when there is none. ``torch.save``: read back with ``weights_only``."""
    if all(state is None for state in states):
        return b""
    buffer = io.BytesIO()
    torch.save(states, buffer)
    return buffer.getvalue()


def decode_streams(raw: bytes) -> list[Any]:
    """`encode_streams`'s states ([] for none, or for bytes that do not read back)."""
    if not raw:
        return []
    try:
        states = torch.load(io.BytesIO(raw), weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
        return []
    return states if isinstance(states, list) else []


class RngRecords:
    """This rank's RNG state at each boundary, in a node-local file that outlives the process.

    Two slots, written in turn with one ``pwrite`` each: a write torn by a kill leaves the other
    slot whole, and the CRC tells the torn one apart.
    """

    def __init__(self, root: Path, rank: int) -> None:
        self.folder = root / RNG_DIR
        self.rank = rank
        self.fds: list[int] = []

    def write(self, generation: int, step: int, world: int, rng: bytes, exact: bool) -> None:
        """``exact``: this is the RNG state at the step's boundary (see `Runtime._keep`)."""
        if not self.fds:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.fds = [
                os.open(self.folder / f"rank-{self.rank}.{slot}", os.O_RDWR | os.O_CREAT, 0o600)
                for slot in (0, 1)
            ]
        body = _META.pack(generation, step, self.rank, world, exact) + rng
        os.pwrite(self.fds[step % 2], _HEAD.pack(_MAGIC, zlib.crc32(body), len(body)) + body, 0)


def machine_records(root: Path, generation: int, step: int, world: int) -> dict[int, bytes]:
    """`read_records` of this node and of the job's other nodes on this machine: a node that
    replaced a dead one (a new pod beside it) finds the dead one's records in its folder."""
    found = read_records(root, generation, step, world)
    with contextlib.suppress(OSError):
        for sibling in sorted(root.parent.iterdir()):
            if sibling != root and (sibling / RNG_DIR).is_dir():
                for rank, blob in read_records(sibling, generation, step, world).items():
                    found.setdefault(rank, blob)
    return found


def read_records(root: Path, generation: int, step: int, world: int) -> dict[int, bytes]:
    """The RNG records of ``step`` of round ``generation`` on this node, by rank."""
    found: dict[int, bytes] = {}
    folder = root / RNG_DIR
    if not folder.is_dir():
        return found
    for path in folder.iterdir():
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        if len(raw) < _HEAD.size + _META.size:
            continue
        magic, crc, length = _HEAD.unpack_from(raw)
        body = raw[_HEAD.size : _HEAD.size + length]
        if magic != _MAGIC or len(body) != length or zlib.crc32(body) != crc:
            continue
        gen, at, rank, size, exact = _META.unpack_from(body)
        if exact and (gen, at, size) == (generation, step, world):
            found[rank] = body[_META.size :]
    return found


def kept_records(folder: Path) -> dict[int, bytes]:
    """The records a restore of this step gathered and kept in its folder (see `keep_records`)."""
    path = folder / RNG_FILE
    if local_tier.recorded(path) is None:
        return {}
    try:
        saved = local_tier.load(path)
    except (OSError, local_tier.CorruptFile, RuntimeError, EOFError):
        return {}
    return {int(rank): bytes(t.numpy().tobytes()) for rank, t in saved.items()}


def keep_records(folder: Path, records: dict[int, bytes]) -> None:
    """Keep the gathered records with the step: the live files move on with the next round."""
    if local_tier.recorded(folder / RNG_FILE) is None:
        payload = {
            str(rank): torch.frombuffer(bytearray(b), dtype=torch.uint8)
            for rank, b in records.items()
        }
        local_tier.save(folder / RNG_FILE, payload)
