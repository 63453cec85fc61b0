"""allocate: examples of each rule (gangs, priorities, equal shares, shrink-to-admit, cooldown)."""

from __future__ import annotations

import pytest

from lattice.operator.core import JobDemand, allocate, demand_for

NOW = 10_000.0


def run(key: str, lo: int, hi: int, current: int, **kw: object) -> JobDemand:
    return JobDemand(key, lo, hi, current=current, running=True, last_resize=0.0, **kw)  # type: ignore[arg-type]


def wait(key: str, lo: int, hi: int, **kw: object) -> JobDemand:
    return JobDemand(key, lo, hi, **kw)  # type: ignore[arg-type]


def test_no_partial_gangs() -> None:
    out = allocate(3, [wait("big", 4, 8), wait("small", 2, 2, created=1)], now=NOW)
    assert out == {"big": 0, "small": 2}


def test_spare_capacity_is_shared_equally_up_to_max() -> None:
    jobs = [wait("a", 1, 10, created=1), wait("b", 1, 10, created=2), wait("c", 1, 2, created=3)]
    out = allocate(12, jobs, now=NOW)
    assert out == {"a": 5, "b": 5, "c": 2}
    assert allocate(100, jobs, now=NOW) == {"a": 10, "b": 10, "c": 2}


def test_higher_priority_gets_spare_first() -> None:
    jobs = [wait("low", 1, 8, priority=0), wait("high", 1, 8, priority=5, created=9)]
    assert allocate(10, jobs, now=NOW) == {"low": 2, "high": 8}


def test_equal_shares_are_counted_in_slots() -> None:
    jobs = [wait("gpu4", 1, 8, slots_per_worker=4), wait("gpu1", 1, 16, created=1)]
    out = allocate(16, jobs, now=NOW)
    assert out["gpu4"] * 4 + out["gpu1"] <= 16
    assert out == {"gpu4": 2, "gpu1": 8}


def test_running_jobs_shrink_toward_min_to_admit_an_equal_priority_job() -> None:
    jobs = [run("r", 2, 8, 8), wait("w", 3, 3, created=1)]
    assert allocate(8, jobs, now=NOW) == {"r": 5, "w": 3}


def test_running_jobs_do_not_shrink_for_a_lower_priority_job() -> None:
    jobs = [run("r", 2, 8, 8, priority=5), wait("w", 3, 3, priority=1)]
    assert allocate(8, jobs, now=NOW) == {"r": 8, "w": 0}


def test_higher_priority_waiting_job_takes_from_lower_priority_first() -> None:
    jobs = [
        run("mid", 1, 6, 4, priority=3),
        run("low", 1, 6, 4, priority=1),
        wait("urgent", 3, 3, priority=5),
    ]
    out = allocate(8, jobs, now=NOW)
    assert out == {"mid": 4, "low": 1, "urgent": 3}


def test_admission_resizes_as_few_jobs_as_possible() -> None:
    running = [run(f"r{i}", 1, 8, 4, created=i) for i in range(4)]
    jobs = [*running, wait("new", 3, 3, created=10)]
    out = allocate(16, jobs, now=NOW)
    assert out["new"] == 3
    shrunk = [k for k in ("r0", "r1", "r2", "r3") if out[k] != 4]
    assert len(shrunk) == 1  # one job gives 3, instead of three jobs giving 1


def test_running_jobs_never_shrink_without_an_admission() -> None:
    jobs = [run("a", 1, 8, 6), run("b", 1, 8, 1, created=1)]
    # b holds far less than a, but nothing is waiting: no rebalancing churn.
    assert allocate(7, jobs, now=NOW) == {"a": 6, "b": 1}


def test_cooldown_stops_growth_but_not_admission() -> None:
    recent = JobDemand("a", 1, 8, current=2, running=True, last_resize=NOW - 10)
    old = JobDemand("b", 1, 8, current=2, running=True, last_resize=NOW - 600, created=1)
    out = allocate(8, [recent, old], now=NOW, resize_cooldown_s=60)
    assert out == {"a": 2, "b": 6}
    # A failure restarts the job anyway, so it may grow at once.
    recovering = JobDemand(
        "a", 1, 8, current=2, running=True, last_resize=NOW - 10, restarting=True
    )
    assert allocate(8, [recovering], now=NOW, resize_cooldown_s=60) == {"a": 8}
    # Cooling down does not protect a job from shrinking to admit another.
    jobs = [JobDemand("a", 1, 8, current=8, running=True, last_resize=NOW - 1), wait("w", 4, 4)]
    assert allocate(8, jobs, now=NOW) == {"a": 4, "w": 4}


def test_new_jobs_grow_at_once() -> None:
    assert allocate(5, [wait("fresh", 1, 8)], now=NOW, resize_cooldown_s=1e9) == {"fresh": 5}


def test_lost_capacity_stops_lowest_ranked_running_jobs() -> None:
    jobs = [run("keep", 2, 4, 4, priority=2), run("stop", 2, 4, 4, priority=1)]
    assert allocate(3, jobs, now=NOW) == {"keep": 3, "stop": 0}


def test_ties_break_by_creation_then_name() -> None:
    jobs = [wait("b", 2, 2, created=5), wait("a", 2, 2, created=5), wait("c", 2, 2, created=1)]
    assert allocate(4, jobs, now=NOW) == {"a": 2, "b": 0, "c": 2}


def test_inadmissible_and_bad_input() -> None:
    assert allocate(10, [JobDemand("x", 3, 2)], now=NOW) == {"x": 0}
    assert allocate(-5, [wait("x", 1, 1)], now=NOW) == {"x": 0}
    with pytest.raises(ValueError, match="unique"):
        allocate(1, [wait("x", 1, 1), wait("x", 1, 1)], now=NOW)


def test_demand_for_reads_spec_and_status() -> None:
    from _operator_world import World, make_job

    world = World(make_job(minSize=2, maxSize=6, priority=3))
    waiting = demand_for(world.job, now=world.now)
    assert waiting is not None
    assert (waiting.key, waiting.min_size, waiting.max_size, waiting.priority) == (
        "lattice/demo",
        2,
        6,
        3,
    )
    assert waiting.waiting and waiting.current == 0
    world.settle(4)
    running = demand_for(world.job, now=world.now)
    assert running is not None and running.running and running.current == 4
    assert running.last_resize == world.now


def test_one_freed_gap_does_not_resize_every_job() -> None:
    running = [run(f"r{i:02d}", 1, 8, 2, created=i) for i in range(20)]
    out = allocate(43, running, now=NOW)  # a finished job left 3 slots free
    assert sorted(out.values()).count(3) == 3
    assert sum(1 for j in running if out[j.key] != j.current) == 3
