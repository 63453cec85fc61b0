"""The agent's round line: written by the agent, read by tools that need the training pids.

The demo, the tests and the chaos soak find the processes to kill this way, like an operator
reading ``kubectl logs`` would.
"""

from __future__ import annotations

import re

ROUND_FORMAT = "round %d: ranks %d-%d of %d on %d node(s), master %s:%d, pids %s"
_ROUND = re.compile(r"round (\d+): ranks .* pids ([\d,]+)")


def round_pids(text: str) -> list[tuple[int, list[int]]]:
    """Every round line in an agent's log as (round, training process pids), oldest first."""
    return [
        (int(rnd), [int(p) for p in pids.split(",") if p]) for rnd, pids in _ROUND.findall(text)
    ]
