"""`TrainingJob.status`: what the operator reports (phase, sizes, restarts, conditions).

Besides what users read, the status holds the few facts the pure reconciler needs to stay
level-triggered across calls (when the job started, last resized, which failures it counted).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import Field

from lattice.api.base import OpenModel

Phase = Literal["Pending", "Running", "Resizing", "Restarting", "Succeeded", "Failed"]
PHASES: tuple[Phase, ...] = ("Pending", "Running", "Resizing", "Restarting", "Succeeded", "Failed")
TERMINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "Failed"})


def utc(t: float) -> datetime:
    """Seconds since the epoch → an aware UTC datetime (how status stores times)."""
    return datetime.fromtimestamp(t, UTC)


class Condition(OpenModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: datetime | None = None


class LastCheckpoint(OpenModel):
    step: int
    time: datetime | None = None


class WorkerFailure(OpenModel):
    """The latest worker failure and how many times in a row it happened the same way."""

    worker: str
    exit_code: int | None = None
    message: str = ""
    count: int = 1


class CapacityLimit(OpenModel):
    """Workers could not be scheduled: the job runs with ``size`` until ``until``, then retries."""

    size: int
    until: datetime
    reason: str = ""


class TrainingJobStatus(OpenModel):
    phase: Phase = "Pending"
    size: int = 0
    target_size: int = 0
    round: int = 0
    restarts: int = 0
    last_checkpoint: LastCheckpoint | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    message: str = ""
    worker_error: str | None = None
    start_time: datetime | None = None
    completion_time: datetime | None = None
    last_resize_time: datetime | None = None
    last_failure: WorkerFailure | None = None
    counted_failures: list[str] = Field(default_factory=list)
    round_failures_seen: int = 0  # the rendezvous' failed-round count last added to restarts
    capacity_limit: CapacityLimit | None = None

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES
