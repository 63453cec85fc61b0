"""The agent's side of the safe-point contract with the addon (docs/architecture.md §8).

The constants come from `lattice.addon.protocol` when it exists, so the two sides cannot drift;
the literal values below are the documented contract for when it does not.
"""

from __future__ import annotations

from pathlib import Path

try:
    from lattice.addon.protocol import SAFEPOINT_EXIT, saving_marker
except ImportError:  # the addon is optional for the agent
    SAFEPOINT_EXIT = 83

    def saving_marker(control_file: str | Path, pid: int) -> Path:
        return Path(f"{control_file}.saving-{pid}")


CHECKPOINT_AND_EXIT = "checkpoint-and-exit"


def bootstrap_dir() -> Path | None:
    """The addon's bootstrap directory (its ``sitecustomize.py``), or None if not installed."""
    try:
        import lattice.addon as addon
    except ImportError:
        return None
    for base in getattr(addon, "__path__", []):
        candidate = Path(base) / "_bootstrap"
        if (candidate / "sitecustomize.py").is_file():
            return candidate
    return None
