"""What `reconcile` asks an adapter to do. Adapters apply the actions in list order.

Applying them and reconciling again with the resulting observed state yields no further
actions: every action is derived from the difference between desired and observed state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lattice.api.status import TrainingJobStatus

LABEL_JOB = "lattice.exabits.ai/job"  # the job's name, on every worker
LABEL_INDEX = "lattice.exabits.ai/worker-index"


@dataclass(frozen=True)
class CreateWorker:
    """Start worker ``index`` of ``job`` (a ``namespace/name`` key).

    The worker is the job's pod template with ``command`` replacing the command and args of
    container ``container`` and ``env`` added to it; ``labels`` go on the pod. The adapter adds
    the job token as ``LATTICE_TOKEN`` (the core never sees secrets). If a worker of that name
    still exists (a pod still terminating), the adapter skips the create: the next reconcile
    asks again.
    """

    job: str
    name: str
    index: int
    command: tuple[str, ...]
    container: str
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DeleteWorker:
    """Delete a worker. ``graceful``: SIGTERM with a grace period, which the agent turns into a
    checkpoint at the next safe point; otherwise delete at once (failed or never-started
    workers)."""

    name: str
    graceful: bool


@dataclass(frozen=True)
class SetRendezvousTarget:
    """Tell the rendezvous service the job's target size, so a round closes once that many
    nodes joined (``job`` is the rendezvous id, `TrainingJob.job_id`)."""

    job: str
    size: int


@dataclass(frozen=True)
class UpdateStatus:
    """Replace the job's status (the status subresource on Kubernetes)."""

    status: TrainingJobStatus


@dataclass(frozen=True)
class EmitEvent:
    """A Kubernetes Event on the job (``lattice describe`` shows them locally)."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class DeleteJob:
    """Delete the TrainingJob itself (``runPolicy.ttlSecondsAfterFinished`` has passed)."""

    reason: str


Action = CreateWorker | DeleteWorker | SetRendezvousTarget | UpdateStatus | EmitEvent | DeleteJob
