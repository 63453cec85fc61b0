"""`benchmarks/checkpoint_overhead.py`'s interleaving: a plain and an addon arm take turns."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[3]
STOP_TAKES_S = 0.05  # a stopped arm may begin one more step while SIGSTOP lands


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "checkpoint_overhead", REPO / "benchmarks" / "checkpoint_overhead.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arms_take_turns_and_each_is_timed_only_while_it_ran(tmp_path: Path) -> None:
    bench = load_bench()
    args = argparse.Namespace(
        steps=150,
        warmup=4,
        width=256,
        depth=4,
        batch=64,
        device="cpu",
        every="1",
        interleave=0.3,
        control=False,
    )
    plain, addon = bench.interleaved(args, tmp_path, None, addon_first=True)
    for arm in (plain, addon):
        assert arm["slices"] >= 2, arm["slices"]  # it was stopped and went on
        ran = arm["ran"]
        for t in arm["began"]:  # no step of an arm began while the other one ran
            assert any(a <= t <= b + STOP_TAKES_S for a, b in ran), (t, ran)
        window = arm["began"][-1] - arm["began"][0]
        assert sum(arm["step_s"]) < window  # its stopped time is not in its steps
    assert addon["checkpoints_in_window"] > 0 and "checkpoints_in_window" not in plain
