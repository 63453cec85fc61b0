"""What an adapter observed about one job: its workers and the rendezvous' view of it.

Adapters (Kubernetes pods, local processes) fill these in; `reconcile` reads nothing else.
Times are seconds since the epoch, like ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

WorkerPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Unschedulable"]
WORKER_PHASES: tuple[WorkerPhase, ...] = (
    "Pending",
    "Running",
    "Succeeded",
    "Failed",
    "Unschedulable",
)


@dataclass(frozen=True)
class WorkerState:
    """One worker (a pod, or a local process) of the job.

    ``uid`` tells a replacement from the worker it replaced under the same name (pod uid,
    process id …); ``deleting`` is true once a delete was issued (a pod with a
    deletionTimestamp): such a worker no longer counts toward the job's size and is not
    deleted again.
    """

    name: str
    index: int
    phase: WorkerPhase
    exit_code: int | None = None
    message: str = ""
    created: float | None = None
    start_time: float | None = None
    uid: str = ""
    deleting: bool = False

    @property
    def identity(self) -> str:
        """Stable for the life of this worker, different for its replacement."""
        return self.uid or f"{self.name}@{self.created if self.created is not None else ''}"


@dataclass(frozen=True)
class RoundInfo:
    """The rendezvous' current round for the job: its generation number and member count."""

    round: int
    size: int
    # Rounds the service saw end in a worker failure (agents re-formed the group without the
    # pod failing); None: unknown. Soft state: it restarts from 0 with the service.
    failed_rounds: int | None = None
    last_failure: str | None = None


@dataclass(frozen=True)
class CheckpointInfo:
    """The job's latest committed checkpoint (from the checkpoint service), if known."""

    step: int
    time: float | None = None


@dataclass(frozen=True)
class Observed:
    """Everything reconcile needs to know about the world for one job.

    ``rendezvous_target`` is the target size the rendezvous service currently holds for the
    job (``None``: unknown or never set), so the target is only sent when it differs.
    """

    workers: tuple[WorkerState, ...] = ()
    round: RoundInfo | None = None
    rendezvous_target: int | None = None
    last_checkpoint: CheckpointInfo | None = None
