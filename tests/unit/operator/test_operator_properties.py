"""Property tests: allocation invariants and reconcile idempotence over random histories."""

from __future__ import annotations

import random

from _operator_world import World, make_job
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lattice.operator.core import JobDemand, allocate

NOW = 10_000.0
COOLDOWN = 60.0
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def demands(draw: st.DrawFn) -> list[JobDemand]:
    jobs = []
    for i in range(draw(st.integers(0, 10))):
        lo = draw(st.integers(1, 6))
        hi = draw(st.integers(lo, lo + 6))
        running = draw(st.booleans())
        jobs.append(
            JobDemand(
                key=f"j{i}",
                min_size=lo,
                max_size=hi,
                priority=draw(st.integers(0, 2)),
                created=float(draw(st.integers(0, 5))),
                current=draw(st.integers(lo, hi)) if running else 0,
                last_resize=NOW - draw(st.sampled_from([1.0, 30.0, 120.0])) if running else None,
                running=running,
                restarting=running and draw(st.booleans()),
                slots_per_worker=draw(st.integers(1, 3)),
            )
        )
    return jobs


def held(j: JobDemand) -> int:
    return min(max(j.current, j.min_size), j.max_size)


def cooling(j: JobDemand) -> bool:
    return bool(j.running and not j.restarting and j.last_resize and NOW - j.last_resize < COOLDOWN)


@FAST
@given(capacity=st.integers(0, 60), jobs=demands())
def test_allocation_invariants(capacity: int, jobs: list[JobDemand]) -> None:
    out = allocate(capacity, jobs, now=NOW, resize_cooldown_s=COOLDOWN)
    assert set(out) == {j.key for j in jobs}
    by_key = {j.key: j for j in jobs}
    # Never above max, never a partial gang, never over capacity.
    for key, n in out.items():
        assert n == 0 or by_key[key].min_size <= n <= by_key[key].max_size
    assert sum(n * by_key[k].slots_per_worker for k, n in out.items()) <= capacity
    running = [j for j in jobs if j.running]
    mins_fit = sum(j.min_size * j.slots_per_worker for j in running) <= capacity
    # Never below min while running (unless the pool cannot hold every running minimum).
    if mins_fit:
        assert all(out[j.key] >= j.min_size for j in running)
    admitted = [j for j in jobs if j.waiting and out[j.key] > 0]
    # Running jobs shrink only to admit a waiting job of equal or higher priority (or when the
    # pool shrank below what they hold).
    if sum(held(j) * j.slots_per_worker for j in running) <= capacity:
        for j in running:
            if out[j.key] < held(j):
                assert any(w.priority >= j.priority for w in admitted), j
    # Hysteresis: a running job in its cooldown does not grow.
    for j in running:
        if cooling(j):
            assert out[j.key] <= held(j)
    # Work conserving: no growable job is left with enough free slots for one more worker.
    free = capacity - sum(n * by_key[k].slots_per_worker for k, n in out.items())
    for j in jobs:
        if 0 < out[j.key] < j.max_size and not cooling(j):
            assert j.slots_per_worker > free, (j, free)


@FAST
@given(capacity=st.integers(0, 60), jobs=demands())
def test_no_starvation_of_an_admissible_job(capacity: int, jobs: list[JobDemand]) -> None:
    """The best-ranked waiting job that fits once equal-or-lower priority jobs shrink to their
    minimum (higher-priority ones keeping their size) is admitted."""
    running = [j for j in jobs if j.running]
    if sum(j.min_size * j.slots_per_worker for j in running) > capacity:
        return
    waiting = sorted((j for j in jobs if j.waiting), key=lambda j: (-j.priority, j.created, j.key))
    if not waiting:
        return
    w = waiting[0]
    floor = sum(
        (held(r) if r.priority > w.priority else r.min_size) * r.slots_per_worker for r in running
    )
    out = allocate(capacity, jobs, now=NOW, resize_cooldown_s=COOLDOWN)
    if floor + w.min_size * w.slots_per_worker <= capacity:
        assert out[w.key] >= w.min_size


@FAST
@given(capacity=st.integers(0, 60), jobs=demands(), seed=st.integers(0, 2**16))
def test_allocation_is_deterministic_whatever_the_input_order(
    capacity: int, jobs: list[JobDemand], seed: int
) -> None:
    first = allocate(capacity, jobs, now=NOW)
    shuffled = list(jobs)
    random.Random(seed).shuffle(shuffled)
    assert allocate(capacity, shuffled, now=NOW) == first


EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(0, 6)),
        st.tuples(st.just("run"), st.integers(0, 7)),
        st.tuples(st.just("fail"), st.integers(0, 7), st.sampled_from([1, 137, None])),
        st.tuples(st.just("unschedulable"), st.integers(0, 7)),
        st.tuples(st.just("succeed"), st.integers(0, 7)),
        st.tuples(st.just("tick"), st.sampled_from([1.0, 50.0, 200.0, 700.0])),
        st.tuples(st.just("finish_deletes")),
    ),
    max_size=25,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=EVENTS,
    slow=st.booleans(),
    lo=st.integers(1, 3),
    extra=st.integers(0, 3),
    backoff=st.integers(0, 4),
)
def test_reconcile_is_idempotent_and_keeps_the_size(
    events: list[tuple], slow: bool, lo: int, extra: int, backoff: int
) -> None:
    job = make_job(
        minSize=lo,
        maxSize=lo + extra,
        runPolicy={"backoffLimit": backoff, "activeDeadlineSeconds": 5000},
    )
    world = World(job, slow_deletes=slow)
    allocation = 0
    for event in events:
        names = world.names()
        kind = event[0]
        if kind == "alloc":
            allocation = event[1]
        elif kind == "tick":
            world.now += event[1]
        elif kind == "finish_deletes":
            world.finish_deletes()
        elif names:
            name = names[event[1] % len(names)]
            if world.workers[name].phase in ("Succeeded", "Failed"):
                continue
            if kind == "run":
                world.set(name, "Running")
            elif kind == "fail":
                world.set(name, "Failed", exit_code=event[2], message="x")
            elif kind == "unschedulable":
                world.set(name, "Unschedulable")
            elif kind == "succeed":
                world.set(name, "Succeeded", exit_code=0)
        world.step(allocation)
        # Idempotence: applying the actions, then reconciling the result, asks for nothing.
        assert world.reconcile(allocation) == [], (event, world.status)
        st_ = world.status
        live = [w for w in world.workers.values() if not w.deleting]
        active = [w for w in live if w.phase in ("Pending", "Running", "Unschedulable")]
        if st_.phase in ("Succeeded", "Failed"):
            assert st_.target_size == 0
            assert not [w for w in active if w.phase != "Running"] or slow
        elif not any(w.phase == "Succeeded" for w in live):
            # The job holds exactly its target, which is 0 or within [min, max].
            assert len(active) == st_.target_size
            assert st_.target_size == 0 or lo <= st_.target_size <= lo + extra
            assert st_.target_size <= max(allocation, 0)
        # Worker names are deterministic: <job>-worker-<index>.
        assert all(w.name == f"demo-worker-{w.index}" for w in world.workers.values())
        assert st_.restarts <= backoff + len(world.workers) + 1


@settings(max_examples=40, deadline=None)
@given(events=EVENTS)
def test_reconcile_is_deterministic(events: list[tuple]) -> None:
    def history() -> list:
        world = World(make_job(minSize=1, maxSize=4))
        out = []
        allocation = 2
        for event in events:
            if event[0] == "alloc":
                allocation = event[1]
            elif event[0] == "tick":
                world.now += event[1]
            elif event[0] == "fail" and world.names():
                world.set(world.names()[event[1] % len(world.names())], "Failed", 1, "x")
            out.append(world.step(allocation))
            world.run_all()
        return out

    assert history() == history()
