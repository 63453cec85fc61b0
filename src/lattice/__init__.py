"""Lattice: elastic training for PyTorch.

The explicit addon API is re-exported here so scripts that want control can write
``import lattice; lattice.register(obj); lattice.checkpoint_now()``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def register(obj: Any, name: str | None = None) -> Any:
    """Add ``obj`` (anything with ``state_dict``/``load_state_dict``) to the checkpointed state."""
    from lattice.addon import api

    return api.register(obj, name=name)


def checkpoint_now() -> None:
    """Checkpoint at once (at the current step boundary) instead of waiting for the policy."""
    from lattice.addon import api

    api.checkpoint_now()


__all__ = ["__version__", "checkpoint_now", "register"]
