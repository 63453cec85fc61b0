"""Copies of training state that are safe to write later and to load with ``weights_only=True``.

Only tensors, containers and primitives go into a checkpoint; numpy's RNG state is converted to
a tensor so no pickled class is needed on load.
"""

from __future__ import annotations

import io
import random
from typing import Any

import torch

try:
    import numpy as np
except ImportError:  # numpy is optional for training scripts
    np = None  # type: ignore[assignment]


def detached_copy(obj: Any) -> Any:
    """Deep copy of a state dict with every tensor cloned to CPU (the training thread goes on).

    Device tensors are copied into pinned host memory asynchronously and waited for once: one
    synchronisation per snapshot instead of one blocking transfer per tensor. Pinned blocks
    come from torch's caching host allocator, so a snapshot reuses the last one's memory.
    """
    devices: set[torch.device] = set()
    copy = _copy(obj, devices)
    for device in devices:
        torch.cuda.current_stream(device).synchronize()
    return copy


def _copy(obj: Any, devices: set[torch.device]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach()
        if tensor.device.type != "cuda":
            return tensor.to("cpu", copy=True)
        out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        out.copy_(tensor, non_blocking=True)
        devices.add(tensor.device)
        return out
    if isinstance(obj, dict):
        return {k: _copy(v, devices) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy(v, devices) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_copy(v, devices) for v in obj)
    return obj


def capture_rng() -> dict[str, Any]:
    """RNG states of python, numpy, torch CPU (and CUDA when available) of this process."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "torch": torch.get_rng_state(),
    }
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if np is not None and "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def loads(payload: bytes) -> Any:
    return torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
