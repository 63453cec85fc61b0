"""Operator at scale: allocation + reconcile for 500 jobs sharing 256 slots.

Section ``pure`` drives the operator's pure core (`allocate`, `reconcile`) through a simulated
timeline: jobs arrive, train, finish, and their workers fail now and then. Pods start one tick
after they are created; a resize or a failure costs the job a restart pause (a checkpoint and a
new rendezvous round) in which it makes no progress. It measures

* the decision time per job: each tick's `allocate` call shared over its jobs plus the job's
  own `reconcile` call (median and p99, microseconds);
* slot utilisation while demand exceeds the pool (running workers' slots / pool);
* job completion times and the wait from arrival to the first training step,

for Lattice's elastic allocation and, on the same workload in the same run, for the non-elastic
alternative: every job a fixed gang of ``maxSize`` workers (a PyTorchJob without elasticity),
admitted in the same priority order with backfill, never resized.

Section ``local`` (`_local_jobs.py`) applies 50 real tiny jobs at once to a real `lattice up`
with 8 slots: time from apply to Running, utilisation while oversubscribed, time to drain.
Sections are functions ``(args) -> dict`` in ``SECTIONS``, chosen with ``--section``.

    python benchmarks/operator_scale.py                 # 500 jobs, 256 slots
    python benchmarks/operator_scale.py --quick         # 120 jobs, 64 slots

Prints progress to stderr and one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from _local_jobs import local_section
from lattice.api import TrainingJob
from lattice.api.status import utc
from lattice.operator.core import (
    Action,
    CreateWorker,
    DeleteWorker,
    JobDemand,
    Observed,
    RoundInfo,
    Services,
    SetRendezvousTarget,
    UpdateStatus,
    WorkerState,
    allocate,
    demand_for,
    reconcile,
)

SERVICES = Services(rendezvous_endpoint="rdzv:29400", checkpoint_endpoint="ckpt:29500")
START = 1_700_000_000.0
Allocator = Callable[[int, Sequence[JobDemand], float], dict[str, int]]


@dataclass
class SimJob:
    job: TrainingJob
    arrival: float
    work: float  # worker-seconds of training left
    workers: dict[str, WorkerState] = field(default_factory=dict)
    rdzv_target: int | None = None
    paused_until: float = 0.0
    finished_at: float | None = None
    started_at: float | None = None
    restarts_seen: int = 0


def make_workload(n: int, seed: int, span_s: float) -> list[SimJob]:
    """``n`` jobs of mixed sizes and priorities arriving over ``span_s`` seconds."""
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        lo = rng.choice([1, 1, 2, 2, 4, 8])
        hi = lo * rng.choice([1, 2, 4, 4])
        priority = rng.choices([0, 1, 2], weights=[70, 20, 10])[0]
        arrival = START + rng.uniform(0, span_s)
        minutes_at_max = rng.uniform(10, 90)
        doc = {
            "apiVersion": "exabits.ai/v1",
            "kind": "TrainingJob",
            "metadata": {
                "name": f"job-{i:03d}",
                "namespace": "bench",
                "creationTimestamp": utc(arrival).isoformat(),
                "generation": 1,
            },
            "spec": {
                "minSize": lo,
                "maxSize": hi,
                "priority": priority,
                "replicaSpecs": {
                    "template": {
                        "spec": {
                            "containers": [
                                {
                                    "name": "trainingjob",
                                    "image": "exabits/lattice-resnet",
                                    "command": ["python", "-u", "main.py"],
                                }
                            ]
                        }
                    }
                },
            },
        }
        job = TrainingJob.model_validate(doc)
        jobs.append(SimJob(job=job, arrival=arrival, work=hi * minutes_at_max * 60.0))
    return sorted(jobs, key=lambda j: j.arrival)


def elastic(capacity: int, demands: Sequence[JobDemand], now: float) -> dict[str, int]:
    return allocate(capacity, demands, now=now)


def fixed_gangs(capacity: int, demands: Sequence[JobDemand], now: float) -> dict[str, int]:
    """The non-elastic alternative: a gang of maxSize or nothing, never resized."""
    out = {d.key: 0 for d in demands}
    free = capacity
    for d in demands:
        if d.running:
            out[d.key] = d.max_size
            free -= d.max_size * d.slots_per_worker
    for d in sorted(demands, key=lambda d: (-d.priority, d.created, d.key)):
        if not d.running and d.max_size * d.slots_per_worker <= free:
            out[d.key] = d.max_size
            free -= d.max_size * d.slots_per_worker
    return out


def apply(sim: SimJob, actions: list[Action], now: float, restart_s: float) -> None:
    for a in actions:
        if isinstance(a, CreateWorker):
            if a.name not in sim.workers:
                sim.workers[a.name] = WorkerState(
                    a.name, a.index, "Pending", created=now, uid=f"{a.name}@{now}"
                )
        elif isinstance(a, DeleteWorker):
            sim.workers.pop(a.name, None)
        elif isinstance(a, SetRendezvousTarget):
            sim.rdzv_target = a.size
        elif isinstance(a, UpdateStatus):
            old = sim.job.current_status()
            new = a.status
            # A resize or a failure of a training job ends its round: a restart pause.
            if old.phase in ("Running", "Resizing", "Restarting") and (
                new.target_size != old.target_size or new.restarts != old.restarts
            ):
                sim.paused_until = now + restart_s
            sim.job = sim.job.model_copy(update={"status": new})


def observed(sim: SimJob) -> Observed:
    running = sum(1 for w in sim.workers.values() if w.phase == "Running")
    return Observed(
        workers=tuple(sim.workers.values()),
        round=RoundInfo(round=0, size=running),
        rendezvous_target=sim.rdzv_target,
    )


def simulate(
    workload: list[SimJob],
    capacity: int,
    allocator: Allocator,
    *,
    tick_s: float,
    fail_per_worker_hour: float,
    restart_s: float,
    seed: int,
) -> dict[str, Any]:
    rng = random.Random(seed)
    jobs = [replace(j, workers={}) for j in workload]
    pending = list(jobs)  # not yet arrived, by arrival time
    active: list[SimJob] = []
    now = START
    decision_us: list[float] = []
    allocate_ms: list[float] = []
    util_busy: list[float] = []
    util_all: list[float] = []
    p_fail = fail_per_worker_hour * tick_s / 3600.0
    failures = resizes = 0
    while pending or active:
        while pending and pending[0].arrival <= now:
            active.append(pending.pop(0))
        # The world moves: pods start, training progresses, workers fail, jobs finish.
        for sim in active:
            running = [w for w in sim.workers.values() if w.phase == "Running"]
            target = sim.job.current_status().target_size
            if running and len(running) == target and now >= sim.paused_until:
                sim.work -= len(running) * tick_s
                if sim.started_at is None:
                    sim.started_at = now
            for name, w in list(sim.workers.items()):
                if w.phase == "Pending":
                    sim.workers[name] = replace(w, phase="Running", start_time=now)
                elif w.phase == "Running" and rng.random() < p_fail:
                    sim.workers[name] = replace(w, phase="Failed", exit_code=137, message="lost")
                    failures += 1
            if sim.work <= 0:
                for name, w in list(sim.workers.items()):
                    if w.phase == "Running":
                        sim.workers[name] = replace(w, phase="Succeeded", exit_code=0)
        # Decisions: one allocation for the pool, one reconcile per job.
        demands = [d for s in active if (d := demand_for(s.job, now=now)) is not None]
        t0 = time.perf_counter()
        alloc = allocator(capacity, demands, now)
        alloc_s = time.perf_counter() - t0
        allocate_ms.append(alloc_s * 1e3)
        share_us = alloc_s * 1e6 / max(1, len(active))
        for sim in active:
            before = sim.job.current_status().target_size
            t0 = time.perf_counter()
            actions = reconcile(
                sim.job, observed(sim), alloc.get(sim.job.key, 0), now=now, services=SERVICES
            )
            decision_us.append((time.perf_counter() - t0) * 1e6 + share_us)
            apply(sim, actions, now, restart_s)
            after = sim.job.current_status().target_size
            if before and after and before != after:
                resizes += 1
        done = [s for s in active if s.job.current_status().terminal]
        for sim in done:
            sim.finished_at = now
        active = [s for s in active if not s.job.current_status().terminal]
        # Utilisation: slots held by running workers (1 slot per worker here).
        busy = sum(
            sum(1 for w in s.workers.values() if w.phase == "Running") * s.job.spec.slots_per_worker
            for s in active
        )
        demand = sum(s.job.spec.max_size * s.job.spec.slots_per_worker for s in active)
        util_all.append(busy / capacity)
        if demand > capacity:
            util_busy.append(busy / capacity)
        now += tick_s
    jct = [s.finished_at - s.arrival for s in jobs if s.finished_at is not None]
    failed = sum(1 for s in jobs if s.job.current_status().phase == "Failed")
    waits = [s.started_at - s.arrival for s in jobs if s.started_at is not None]
    return {
        "decision_us_median": round(statistics.median(decision_us), 1),
        "decision_us_p99": round(_quantile(decision_us, 0.99), 1),
        "allocate_ms_median": round(statistics.median(allocate_ms), 3),
        "allocate_ms_p99": round(_quantile(allocate_ms, 0.99), 3),
        "utilisation_while_oversubscribed": round(statistics.fmean(util_busy), 4)
        if util_busy
        else None,
        "oversubscribed_ticks": len(util_busy),
        "ticks": len(util_all),
        "makespan_h": round((now - START) / 3600.0, 2),
        "jct_mean_min": round(statistics.fmean(jct) / 60.0, 1),
        "jct_p90_min": round(_quantile(jct, 0.9) / 60.0, 1),
        "wait_to_start_mean_min": round(statistics.fmean(waits) / 60.0, 1),
        "wait_to_start_p90_min": round(_quantile(waits, 0.9) / 60.0, 1),
        "jobs_succeeded": sum(1 for s in jobs if s.job.current_status().phase == "Succeeded"),
        "jobs_failed": failed,
        "worker_failures": failures,
        "resizes": resizes,
        "decisions": len(decision_us),
    }


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def pure_section(args: argparse.Namespace) -> dict[str, Any]:
    """allocate + reconcile over a simulated timeline, elastic vs fixed gangs."""
    workload = make_workload(args.jobs, args.seed, args.arrival_span_h * 3600.0)
    common = {
        "tick_s": args.tick_s,
        "fail_per_worker_hour": args.fail_per_worker_hour,
        "restart_s": args.restart_s,
        "seed": args.seed,
    }
    out: dict[str, Any] = {
        "jobs": args.jobs,
        "slots": args.slots,
        "tick_s": args.tick_s,
        "restart_s": args.restart_s,
        "fail_per_worker_hour": args.fail_per_worker_hour,
    }
    for name, allocator in (("lattice_elastic", elastic), ("fixed_gangs_at_max", fixed_gangs)):
        t0 = time.perf_counter()
        out[name] = simulate(workload, args.slots, allocator, **common)
        out[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"[pure] {name}: {json.dumps(out[name])}", file=sys.stderr)
    return out


SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "pure": pure_section,
    "local": local_section,
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--section", action="append", choices=sorted(SECTIONS), help="repeatable")
    p.add_argument("--jobs", type=int, default=500)
    p.add_argument("--slots", type=int, default=256)
    p.add_argument("--arrival-span-h", type=float, default=8.0)
    p.add_argument("--tick-s", type=float, default=30.0)
    p.add_argument("--restart-s", type=float, default=30.0, help="pause per resize/failure")
    p.add_argument("--fail-per-worker-hour", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="120 jobs on 64 slots; 12 local jobs")
    p.add_argument("--local-jobs", type=int, default=50, help="section local: real jobs")
    p.add_argument("--local-slots", type=int, default=8)
    p.add_argument("--local-work-s", type=float, default=5.0, help="each worker sleeps this long")
    p.add_argument("--local-bound-s", type=float, default=900.0)
    args = p.parse_args(argv)
    if args.quick:
        args.jobs, args.slots, args.arrival_span_h = 120, 64, 8.0
        args.local_jobs, args.local_slots = 12, 4
    report: dict[str, Any] = {"benchmark": "operator_scale"}
    for name in args.section or list(SECTIONS):
        report[name] = SECTIONS[name](args)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
