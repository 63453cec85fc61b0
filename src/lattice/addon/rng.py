"""Random number generator states of one process, as plain trees (no pickling needed).

Python's ``random`` and numpy's legacy global generator give tuples with big ints and arrays;
they are stored as int64 tensors and numbers so the checkpoint format can carry them.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import torch


def capture() -> dict[str, Any]:
    """All global RNG states this process uses (numpy only if the script imported it)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
    }
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore(state: dict[str, Any]) -> None:
    py = state.get("python")
    if py is not None:
        internal = tuple(int(x) for x in py["state"].tolist())
        random.setstate((int(py["version"]), internal, py["gauss"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].clone())
    npst = state.get("numpy")
    np = sys.modules.get("numpy")
    if npst is not None and np is not None:
        keys = npst["keys"].numpy().astype("uint32")
        np.random.set_state(
            (npst["kind"], keys, npst["pos"], npst["has_gauss"], npst["cached"])
        )
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        for device, st in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(st.clone(), device)


def generator_state(gen: Any) -> torch.Tensor | None:
    return gen.get_state() if isinstance(gen, torch.Generator) else None


def set_generator_state(gen: Any, st: torch.Tensor | None) -> None:
    if isinstance(gen, torch.Generator) and st is not None:
        gen.set_state(st.clone())
