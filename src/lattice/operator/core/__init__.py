"""The operator's pure core: allocation across jobs and per-job reconcile. No I/O.

Adapters (Kubernetes in `lattice.operator.kubernetes`, the local control plane in
`lattice.operator.local`) observe the world, call `allocate` for the pool and `reconcile` for
each job, and apply the returned actions in order.
"""

from lattice.operator.core.actions import (
    LABEL_INDEX,
    LABEL_JOB,
    Action,
    CreateWorker,
    DeleteJob,
    DeleteWorker,
    EmitEvent,
    SetRendezvousTarget,
    UpdateStatus,
)
from lattice.operator.core.allocate import (
    DEFAULT_RESIZE_COOLDOWN_S,
    JobDemand,
    allocate,
    demand_for,
)
from lattice.operator.core.observed import (
    WORKER_PHASES,
    CheckpointInfo,
    Observed,
    RoundInfo,
    WorkerPhase,
    WorkerState,
)
from lattice.operator.core.reconcile import ReconcileConfig, reconcile
from lattice.operator.core.worker import (
    Services,
    nproc_per_node,
    user_command,
    worker_command,
    worker_env,
)

__all__ = [
    "DEFAULT_RESIZE_COOLDOWN_S",
    "LABEL_INDEX",
    "LABEL_JOB",
    "WORKER_PHASES",
    "Action",
    "CheckpointInfo",
    "CreateWorker",
    "DeleteJob",
    "DeleteWorker",
    "EmitEvent",
    "JobDemand",
    "Observed",
    "ReconcileConfig",
    "RoundInfo",
    "Services",
    "SetRendezvousTarget",
    "UpdateStatus",
    "WorkerPhase",
    "WorkerState",
    "allocate",
    "demand_for",
    "nproc_per_node",
    "reconcile",
    "user_command",
    "worker_command",
    "worker_env",
]
