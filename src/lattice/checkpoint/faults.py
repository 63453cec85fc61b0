"""Fault points of the commit protocol, for crash-consistency tests.

With ``LATTICE_FAULT_POINT=<name>`` the process exits abruptly (``os._exit``) when it reaches
that point, as a power cut or kill -9 would stop it there.
"""

from __future__ import annotations

import os

POINTS = (
    "shard-temp-written",
    "shard-before-rename",
    "shard-after-rename",
    "commit-before-manifest",
    "commit-manifest-temp-written",
    "commit-after-manifest",
)


def fault(point: str) -> None:
    """Crash here if the environment asks for it."""
    if os.environ.get("LATTICE_FAULT_POINT") == point:
        os._exit(1)
