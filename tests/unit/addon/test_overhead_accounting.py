"""`benchmarks/checkpoint_overhead.py`'s in-run accounting: what a snapshot cost its own run."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "checkpoint_overhead.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("checkpoint_overhead", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def addon_arm(step: float, n: int, writes: dict[int, int], stall: float, slower: float) -> Any:
    """``n`` steps of ``step`` s; a snapshot after step d (a key) whose write spans the next
    ``writes[d]`` steps, each ``slower`` s slower; its stall lands in step d."""
    step_s, beside = [step] * n, [False] * n
    for d, length in writes.items():
        step_s[d] += stall
        for j in range(d + 1, d + 1 + length):
            step_s[j] += slower
            beside[j] = True
    return {
        "step_s": step_s,
        "beside_write": beside,
        "snapshot_after": sorted(writes),
        "interval_steps": 100,
    }


def test_a_span_runs_from_the_stall_through_the_write_and_a_little_after(bench: Any) -> None:
    arm = addon_arm(0.1, 60, {20: 4, 45: 2}, stall=0.3, slower=0.05)
    assert bench.spans(arm["snapshot_after"], arm["beside_write"]) == [(20, 27), (45, 50)]


def test_a_span_never_reaches_into_the_next_snapshot(bench: Any) -> None:
    beside = [False] * 30
    for j in range(11, 25):
        beside[j] = True
    assert bench.spans([10, 13], beside) == [(10, 13), (13, 27)]


def test_a_snapshot_costs_its_stall_plus_what_the_steps_beside_it_lost(bench: Any) -> None:
    arm = addon_arm(0.1, 60, {20: 4, 45: 2}, stall=0.3, slower=0.05)
    book = bench.accounted(arm, [{"step_s": [0.1] * 60}])
    assert book["checkpoint_costs_s"] == pytest.approx([0.5, 0.4])
    # 0.45 s per checkpoint every 100 steps of 0.1 s
    assert book["accounted_pct"] == pytest.approx(4.5)
    assert book["control_pct"] == pytest.approx(0.0)


def test_drift_between_arms_does_not_enter_the_account(bench: Any) -> None:
    """The addon arm ran on a machine 20 % slower than the plain arms (a neighbour's load):
    the throughput ratio reads 17 % overhead, the account still reads the 0.45 s spent."""
    arm = addon_arm(0.12, 60, {20: 4, 45: 2}, stall=0.3, slower=0.05)
    book = bench.accounted(arm, [{"step_s": [0.1] * 60}])
    assert book["checkpoint_costs_s"] == pytest.approx([0.5, 0.4])
    assert book["accounted_pct"] == pytest.approx(100 * 0.45 / (100 * 0.12))


def test_a_plain_arm_that_slowed_at_those_steps_shows_in_the_control(bench: Any) -> None:
    arm = addon_arm(0.1, 60, {20: 4}, stall=0.3, slower=0.05)
    plain = [0.1] * 60
    plain[22] = 0.2  # something else took the machine for one step
    book = bench.accounted(arm, [{"step_s": plain}])
    assert book["control_pct"] == pytest.approx(100 * 0.1 / (100 * 0.1))


def test_a_snapshot_with_too_few_quiet_steps_before_it_is_left_out(bench: Any) -> None:
    arm = addon_arm(0.1, 40, {5: 2, 25: 2}, stall=0.3, slower=0.05)
    book = bench.accounted(arm, [{"step_s": [0.1] * 40}])
    assert book["checkpoint_costs_s"] == pytest.approx([0.4])
    no_room = addon_arm(0.1, 20, {5: 2}, stall=0.3, slower=0.05)
    book = bench.accounted(no_room, [{"step_s": [0.1] * 20}])
    assert book["checkpoint_costs_s"] == [] and book["accounted_pct"] is None


def test_side_by_side_counts_only_the_window_where_both_arms_timed(bench: ModuleType) -> None:
    """The plain arm starts 5 s earlier and ends 10 s later than the addon arm, at 10 steps/s
    when alone and 8 steps/s beside it: only the shared window's rates are compared."""
    alone = [i * 0.1 for i in range(50)]  # 0 .. 4.9 s, on its own
    shared = [5.0 + i * 0.125 for i in range(81)]  # 5 .. 15 s: 8 steps/s
    after = [15.0 + (i + 1) * 0.1 for i in range(100)]  # alone again
    plain = {"began": alone + shared + after}
    addon = {"began": [5.0 + i * 0.125 * 1.25 for i in range(65)]}  # 6.4 steps/s, 5 .. 15 s
    assert bench.common_window_ratio(plain, addon) == pytest.approx(0.8, rel=0.02)
    with pytest.raises(SystemExit):
        bench.common_window_ratio({"began": [0.0, 1.0]}, {"began": [2.0, 3.0]})
