"""The addon's side of the agent ↔ addon contract (docs/architecture.md §8).

This module is the single definition; `lattice.agent.protocol` imports it.
"""

from __future__ import annotations

SAFEPOINT_EXIT = 83
"""Exit code of a training process that checkpointed at a safe point on request."""

CHECKPOINT_AND_EXIT = "checkpoint-and-exit"
"""What the agent writes into ``LATTICE_CONTROL_FILE`` to ask for a safe point."""

ENV_JOB = "LATTICE_JOB"
ENV_AUTOPATCH = "LATTICE_AUTOPATCH"
ENV_LOCAL_DIR = "LATTICE_LOCAL_CKPT_DIR"
ENV_CONTROL_FILE = "LATTICE_CONTROL_FILE"
ENV_EVERY = "LATTICE_CHECKPOINT_EVERY"
ENV_ENDPOINT = "LATTICE_CHECKPOINT_ENDPOINT"
ENV_TOKEN = "LATTICE_TOKEN"


def autopatch_enabled(env: dict[str, str] | None = None) -> bool:
    """True when the addon should activate: a Lattice job, and autopatch not set to ``none``."""
    import os

    env = dict(os.environ) if env is None else env
    if not env.get(ENV_JOB):
        return False
    setting = env.get(ENV_AUTOPATCH, "torch,transformers").strip().lower()
    return "torch" in {part.strip() for part in setting.split(",")}
