"""The addon's side of the contracts with the agent (docs/architecture.md §8).

The agent imports ``SAFEPOINT_EXIT`` from here, so the two sides cannot drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

SAFEPOINT_EXIT = 83  # exit code: "checkpoint committed at a safe point, as you asked"
CHECKPOINT_AND_EXIT = "checkpoint-and-exit"  # what the agent writes into LATTICE_CONTROL_FILE

ENV_JOB = "LATTICE_JOB"
ENV_ROUND = "LATTICE_ROUND"
ENV_TOKEN = "LATTICE_TOKEN"
ENV_ENDPOINT = "LATTICE_CHECKPOINT_ENDPOINT"
ENV_LOCAL_DIR = "LATTICE_LOCAL_CKPT_DIR"
ENV_CONTROL_FILE = "LATTICE_CONTROL_FILE"
ENV_AUTOPATCH = "LATTICE_AUTOPATCH"
ENV_EVERY = "LATTICE_CHECKPOINT_EVERY"
ENV_KEEP = "LATTICE_CHECKPOINT_KEEP"
ENV_LOG = "LATTICE_ADDON_LOG"  # log level of the addon's own lines (default INFO)


def saving_marker(control_file: str | Path, pid: int) -> Path:
    """The file a worker keeps while it saves on its way out (the last finished step after a
    failure, a checkpoint still being written at SIGTERM): the agent's SIGKILL waits for it,
    up to its save grace, instead of cutting the save at the kill grace."""
    return Path(f"{control_file}.saving-{pid}")


def say(msg: str) -> None:
    """One line of the addon's in the worker's stderr (the agent prefixes it with the rank)."""
    print(f"lattice addon: {msg}", file=sys.stderr, flush=True)


__all__ = [
    "CHECKPOINT_AND_EXIT",
    "ENV_AUTOPATCH",
    "ENV_CONTROL_FILE",
    "ENV_ENDPOINT",
    "ENV_EVERY",
    "ENV_JOB",
    "ENV_KEEP",
    "ENV_LOCAL_DIR",
    "ENV_LOG",
    "ENV_ROUND",
    "ENV_TOKEN",
    "SAFEPOINT_EXIT",
    "saving_marker",
    "say",
]
