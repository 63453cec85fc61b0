"""Prometheus metrics of the rendezvous service (registered in the app's own registry)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class RendezvousMetrics:
    """What an operator watches: jobs, members, waiting nodes, rounds and how fast they form."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        jobs: Callable[[], float],
        members: Callable[[], float],
        waiting: Callable[[], float],
    ) -> None:
        Gauge(
            "lattice_rendezvous_jobs", "Jobs the service holds state for", registry=registry
        ).set_function(jobs)
        Gauge(
            "lattice_rendezvous_members", "Nodes in running rounds, all jobs", registry=registry
        ).set_function(members)
        Gauge(
            "lattice_rendezvous_waiting", "Nodes waiting for a round, all jobs", registry=registry
        ).set_function(waiting)
        self.rounds_closed = Counter(
            "lattice_rendezvous_rounds_closed",
            "Rounds closed, by what closed them (max, target, rejoin, settle, adopted)",
            ["trigger"],
            registry=registry,
        )
        self.round_ends = Counter(
            "lattice_rendezvous_round_ends",
            "Running rounds ended, by reason",
            ["reason"],
            registry=registry,
        )
        self.close_latency = Histogram(
            "lattice_rendezvous_round_close_seconds",
            "From the first member starting to wait until its round closed",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
            registry=registry,
        )
