"""The operator's Prometheus metrics (served on ``/metrics`` by the operator's HTTP app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class OperatorMetrics:
    """What an operator replica is doing: leading or not, cycles, actions, conflicts, errors."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.registry = registry
        self.leader = Gauge(
            "lattice_operator_leader", "1 while this replica holds the lease", registry=registry
        )
        self.cycles = Counter(
            "lattice_operator_cycles", "reconcile cycles over all jobs", registry=registry
        )
        self.cycle_seconds = Histogram(
            "lattice_operator_cycle_seconds",
            "duration of one reconcile cycle",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.actions = Counter(
            "lattice_operator_actions", "actions applied", ["action"], registry=registry
        )
        self.conflicts = Counter(
            "lattice_operator_conflicts",
            "writes refused for a stale resourceVersion (re-read and retried)",
            registry=registry,
        )
        self.errors = Counter(
            "lattice_operator_errors", "failed calls", ["target"], registry=registry
        )
        self.jobs = Gauge(
            "lattice_operator_jobs", "TrainingJobs by phase", ["phase"], registry=registry
        )
        self.capacity = Gauge(
            "lattice_operator_capacity_slots",
            "slots the jobs of a resource unit share",
            ["unit"],
            registry=registry,
        )
