"""`benchmarks/sharded_checkpoint.py --quick`: the short version of the sharded benchmark."""

from __future__ import annotations

from .harness import quick_benchmark


def test_quick_run_reports_every_figure_and_a_rank_holds_its_share() -> None:
    result = quick_benchmark("sharded_checkpoint", timeout=300)
    for key in (
        "lattice_stall_s",
        "lattice_write_s",
        "dcp_save_s",
        "full_gather_s",
        "lattice_restore_s",
        "dcp_load_s",
        "lattice_reshard_restore_s",
        "dcp_reshard_load_s",
    ):
        assert result[key] > 0, key
    # Each of the 2 ranks saves half of what a full-state gather puts on rank 0 (less the
    # optimizer's step counters, which are in the skeleton).
    halves = result["shard_bytes_this_rank"] * 2
    assert halves <= result["full_state_bytes_rank0"] < halves + 1024
