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
    """Deep copy of a state dict with every tensor cloned to CPU (the training thread goes on)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: detached_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [detached_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(detached_copy(v) for v in obj)
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
