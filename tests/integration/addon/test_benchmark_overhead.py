"""`benchmarks/checkpoint_overhead.py --quick`: the short version of the overhead benchmark."""

from __future__ import annotations

from .harness import quick_benchmark


def test_quick_run_trains_both_arms_and_times_the_addons_snapshots_and_restore() -> None:
    result = quick_benchmark("checkpoint_overhead", timeout=600)
    assert result["params"] >= 50_000_000  # the model size
    assert len(result["throughput_ratios"]) == 1 and result["throughput_ratios"][0] > 0
    # The addon arm really ran the addon: it calibrated an interval from its own snapshots,
    # then restored its last checkpoint, as did torch.load from a file of the same state.
    assert result["interval_steps"] >= 1
    assert result["stall_s_mean"] > 0 and result["write_s_mean"] > 0
    assert result["restore_s_addon"] > 0 and result["restore_s_torch_load"] > 0


def test_quick_side_by_side_run_times_both_arms_at_once() -> None:
    result = quick_benchmark("checkpoint_overhead", 600, "--side-by-side")
    assert result["side_by_side"] and len(result["throughput_ratios"]) == 1
    assert result["throughput_ratios"][0] > 0 and result["interval_steps"] >= 1
