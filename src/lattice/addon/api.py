"""Explicit addon API for scripts that want control (re-exported as `lattice.register`)."""

from __future__ import annotations

from typing import Any

from lattice.common.errors import UserError


def register(obj: Any, name: str | None = None) -> Any:
    """Checkpoint ``obj`` (anything with ``state_dict``/``load_state_dict``) with the rest."""
    from lattice.addon import data, runtime

    if not data.has_state(obj):
        raise UserError(f"lattice.register: {type(obj).__name__} has no state_dict/load_state_dict")

    rt = runtime.current()
    if rt is not None:
        rt.registered[name or f"{type(obj).__name__}.{len(rt.registered)}"] = obj
    return obj


def checkpoint_now() -> None:
    """Checkpoint at the next step boundary regardless of the interval (no-op without the addon)."""
    from lattice.addon import runtime

    rt = runtime.current()
    if rt is not None:
        rt.force = True
