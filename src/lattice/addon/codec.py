"""The checkpoint file format (``.ltck``): JSON header, raw tensor bytes, checksum trailer.

Why not pickle: a checkpoint comes back from shared memory or a network service, and loading
must never run code. A file is ``MAGIC | u64 header length | header JSON | aligned tensor
bytes | sha256 of all that | TRAILER``. The header's ``tree`` is the state with every tensor
replaced by ``{"$t": index}``; tuples, dicts with non-string keys and numpy arrays are tagged
so they come back as they went. Loading = reading bytes, checking the hash, JSON, and
``torch.frombuffer``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MAGIC = b"LTCK\x01\n\x00\x00"
TRAILER = b"LTCKEND\x00"
ALIGN = 64
FOOTER = 32 + len(TRAILER)
FORMAT = 1
_DTYPES = {str(v): v for v in vars(torch).values() if isinstance(v, torch.dtype)}


class CorruptFile(Exception):
    """A checkpoint file fails its checksum or does not parse."""


class UnsupportedState(TypeError):
    """A state holds a value the format does not carry (it is never pickled)."""


# -- trees ---------------------------------------------------------------------------------
def encode(tree: Any, tensors: list[torch.Tensor]) -> Any:
    """JSON-able form of ``tree``; tensors are appended to ``tensors`` (not copied)."""
    if tree is None or isinstance(tree, bool | int | float | str):
        return tree
    if isinstance(tree, torch.Tensor):
        tensors.append(tree)
        return {"$t": len(tensors) - 1}
    if isinstance(tree, list):
        return [encode(x, tensors) for x in tree]
    if isinstance(tree, tuple):
        return {"$tuple": [encode(x, tensors) for x in tree]}
    if isinstance(tree, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in tree):
            return {k: encode(v, tensors) for k, v in tree.items()}
        return {"$dict": [[encode(k, tensors), encode(v, tensors)] for k, v in tree.items()]}
    module = type(tree).__module__
    if module == "numpy":
        import numpy as np

        if isinstance(tree, np.ndarray):
            tensors.append(torch.from_numpy(np.ascontiguousarray(tree)))
            return {"$np": len(tensors) - 1}
        if isinstance(tree, np.generic):
            return tree.item()
    if isinstance(tree, torch.dtype):
        return {"$dtype": str(tree)}
    if isinstance(tree, torch.device):
        return {"$device": str(tree)}
    raise UnsupportedState(f"a {type(tree).__qualname__} cannot be checkpointed")


def decode(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, list):
        return [decode(x, tensors) for x in obj]
    if not isinstance(obj, dict):
        raise CorruptFile(f"unexpected {type(obj).__name__} in a state tree")
    if len(obj) == 1:
        ((tag, value),) = obj.items()
        if tag == "$t":
            return tensors[_index(value, tensors)]
        if tag == "$np":
            return tensors[_index(value, tensors)].numpy()
        if tag == "$tuple":
            return tuple(decode(x, tensors) for x in _list(value))
        if tag == "$dict":
            return {decode(k, tensors): decode(v, tensors) for k, v in _pairs(value)}
        if tag == "$dtype":
            return _dtype(value)
        if tag == "$device":
            return torch.device(str(value))
    return {k: decode(v, tensors) for k, v in obj.items()}


def _index(value: Any, tensors: list[torch.Tensor]) -> int:
    if not isinstance(value, int) or not 0 <= value < len(tensors):
        raise CorruptFile(f"tensor reference {value!r} out of range")
    return value


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise CorruptFile("a tagged list is not a list")
    return value


def _pairs(value: Any) -> list[list[Any]]:
    pairs = _list(value)
    if not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise CorruptFile("a tagged dict is not a list of pairs")
    return pairs


def _dtype(name: Any) -> torch.dtype:
    dtype = _DTYPES.get(str(name))
    if dtype is None:
        raise CorruptFile(f"unknown dtype {name!r}")
    return dtype


# -- files ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Written:
    sha256: str  # of the whole file, as the checkpoint service computes it
    size: int


def _raw(t: torch.Tensor) -> memoryview:
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def _pad(n: int) -> bytes:
    return b"\x00" * (-n % ALIGN)


def chunks(meta: dict[str, Any], tree: Any, tensors: list[torch.Tensor]) -> Iterator[Any]:
    """The file's bytes as chunks (tensors are not copied). ``tensors`` must be contiguous CPU."""
    table, offset = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        table.append([str(t.dtype), list(t.shape), offset, nbytes])
        offset += nbytes + (-nbytes % ALIGN)
    header = json.dumps(
        {"format": FORMAT, "meta": meta, "tree": tree, "tensors": table}, separators=(",", ":")
    ).encode()
    head = MAGIC + struct.pack("<Q", len(header)) + header
    digest = hashlib.sha256()
    for part in (head, _pad(len(head))):
        digest.update(part)
        yield part
    for t in tensors:
        raw = _raw(t)
        digest.update(raw)
        yield raw
        pad = _pad(raw.nbytes)
        digest.update(pad)
        yield pad
    yield digest.digest() + TRAILER


def write_file(path: Path, meta: dict[str, Any], tree: Any, tensors: list[torch.Tensor]) -> Written:
    """Write atomically (temporary name, then rename): a reader sees all of it or nothing."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    whole = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as f:
            for part in chunks(meta, tree, tensors):
                whole.update(part)
                size += len(part) if isinstance(part, bytes) else part.nbytes
                f.write(part)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Written(whole.hexdigest(), size)


def read_file(path: Path) -> tuple[dict[str, Any], Any, list[torch.Tensor]]:
    size = path.stat().st_size
    buf = bytearray(size)
    with open(path, "rb", buffering=0) as f:
        view, got = memoryview(buf), 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                raise CorruptFile(f"{path} shrank while being read")
            got += n
    return parse(buf)


def parse(buf: bytearray | bytes) -> tuple[dict[str, Any], Any, list[torch.Tensor]]:
    """``(meta, tree, tensors)`` of a file's bytes, after checking its checksum and layout."""
    if not isinstance(buf, bytearray):
        buf = bytearray(buf)  # tensors are writable views of it
    size = len(buf)
    if size < len(MAGIC) + 8 + FOOTER or bytes(buf[: len(MAGIC)]) != MAGIC:
        raise CorruptFile("not a Lattice checkpoint file (bad magic)")
    if bytes(buf[-len(TRAILER) :]) != TRAILER:
        raise CorruptFile("truncated checkpoint file (no trailer)")
    view = memoryview(buf)
    if hashlib.sha256(view[:-FOOTER]).digest() != bytes(buf[-FOOTER : -len(TRAILER)]):
        raise CorruptFile("checkpoint file fails its checksum")
    (hlen,) = struct.unpack_from("<Q", buf, len(MAGIC))
    start = len(MAGIC) + 8
    try:
        header = json.loads(bytes(view[start : start + hlen]))
    except ValueError as exc:
        raise CorruptFile(f"bad header: {exc}") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CorruptFile("unknown checkpoint format")
    data = start + hlen + (-(start + hlen) % ALIGN)
    end = size - FOOTER
    tensors = []
    for entry in header.get("tensors", []):
        tensors.append(_tensor(buf, entry, data, end))
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise CorruptFile("meta is not an object")
    return meta, header.get("tree"), tensors


def _tensor(buf: bytearray, entry: Any, data: int, end: int) -> torch.Tensor:
    try:
        name, shape, offset, nbytes = entry
        dtype = _dtype(name)
        shape = [int(s) for s in shape]
        numel = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        ok = min(shape, default=0) >= 0 and nbytes == numel * itemsize and offset >= 0
    except (TypeError, ValueError) as exc:
        raise CorruptFile(f"bad tensor entry {entry!r}") from exc
    if not ok or data + offset + nbytes > end:
        raise CorruptFile(f"bad tensor entry {entry!r}")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=data + offset)
    return raw.view(dtype).reshape(shape)
