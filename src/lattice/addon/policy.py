"""When to checkpoint: the interval at which checkpointing costs training its budget.

The runtime measures steps and snapshots (stall, write, upload); these figures turn them into an
interval. Kept apart so the arithmetic is tested without a training process.
"""

from __future__ import annotations

import collections.abc
import math

CALIBRATION_STEPS = 6
CALIBRATION_SNAPSHOTS = 2


def mean(samples: list[float]) -> float:
    return sum(samples) / len(samples)


def median(samples: collections.abc.Iterable[float]) -> float:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2] if ordered else 0.0


def typical(samples: list[float]) -> float:
    """The cost of a warm snapshot: the latest sample (the first pays one-time costs)."""
    return samples[-1] if samples else 0.0


OVERHEAD_BUDGET = 0.03  # what checkpointing may cost training, as a share of its time
# The interval is sized for less than the budget: one checkpoint's cost, as the steps beside it
# measure it, varies by about ±20 % around the policy's estimate (0.82-1.34 s in one run of
# benchmarks/checkpoint_overhead.py), and sizing for the budget itself put every other run
# above it.
OVERHEAD_AIM = OVERHEAD_BUDGET / 1.2
RECENT_STEPS = 256  # step times kept for the policy (a median of them)
RECENT_SNAPSHOTS = 4  # snapshot costs the policy averages once calibrated
# Keeping each boundary for a failed step (failed_step.py) comes out of the same budget; where
# it would cost more than this share of a step, it is not done.
KEEP_MAX_SHARE = 0.02
# Looking for the models again (a `gc` scan) once a module was copied: at most this share of
# the run's time (a script may deep-copy one every step).
SCAN_SHARE = 0.005


def steps_for(cost_s: float, step_s: float, spent: float = 0.0) -> int:
    """The interval at which a checkpoint costing ``cost_s`` is `OVERHEAD_AIM` of the steps,
    less the share ``spent`` on each step already (rounded first: 1.0 / 0.00025 is
    4000.0000000000005 in floats)."""
    aim = max(OVERHEAD_AIM - spent, OVERHEAD_AIM - KEEP_MAX_SHARE)
    return max(1, math.ceil(round(cost_s / (aim * step_s), 6)))
