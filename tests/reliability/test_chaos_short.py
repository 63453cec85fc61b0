"""Chaos soak, short: `benchmarks/chaos.py`'s core against a real `lattice up`.

One elastic job (minSize 1, maxSize 3, a checkpoint every step) survives one fault of every kind
(kill -9 of a training process, of an agent, of rank 0 mid-upload; SIGTERM of a pod; restarts
of the rendezvous and checkpoint services; a slot taken away; a competing job), and then:
it Succeeded, every committed checkpoint reads back with its sha256, every sample was consumed
exactly once per epoch once the steps redone after restores are reconciled, a kill -9 lost at
most one step, a planned event none, and no process is left. The long version (`-m soak`)
injects 30 seeded faults.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_chaos() -> Any:
    spec = importlib.util.spec_from_file_location("lattice_chaos", REPO / "benchmarks" / "chaos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


chaos = _load_chaos()


def _soak(home: Path, faults: int, seed: int) -> dict[str, Any]:
    settings = chaos.Settings(faults=faults, seed=seed, home=home)
    result: dict[str, Any] = chaos.Chaos(settings, say=lambda msg: print(msg, flush=True)).run()
    print(result)
    return result


def _check(result: dict[str, Any]) -> None:
    assert result["job_phase"] == "Succeeded", result
    assert result["lattice_up_exit"] == 0, result
    assert result["faults_survived"] == result["faults_injected"], result["faults"]
    assert result["corrupted_checkpoints"] == 0, result
    assert result["checkpoints_verified"] > 0, result
    assert result["missing"] == 0, result
    assert result["duplicates"] == 0, result
    assert result["incomplete_steps"] == 0 and result["step_gaps"] == 0, result
    assert not result["ledger_anomalies"], result
    assert result["steps_lost_per_kill9"]["max"] <= 1, result["faults"]
    assert result["steps_lost_planned"] == 0, result["faults"]
    assert result["steps_lost_service_restarts"] == 0, result["faults"]
    assert result["steps_lost_startup"] == 0, result
    assert all(phase == "Succeeded" for phase in result["rivals"].values()), result["rivals"]
    assert result["leftover_processes"] == 0, result


@pytest.mark.timeout(900)
def test_every_fault_kind_once(tmp_path: Path, clean_env: dict[str, str]) -> None:
    kinds = chaos.schedule(len(chaos.KINDS), seed=5)
    assert set(kinds) == set(chaos.KINDS)  # each kind at least once
    result = _soak(tmp_path / "home", len(kinds), seed=5)
    assert result["faults_injected"] == len(chaos.KINDS)
    _check(result)


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_thirty_seeded_faults(
    tmp_path: Path, clean_env: dict[str, str], request: pytest.FixtureRequest
) -> None:
    if "soak" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("long soak: run with -m soak")
    result = _soak(tmp_path / "home", 30, seed=1)
    assert result["faults_injected"] == 30
    _check(result)


def test_ledger_reconciliation_counts_redone_steps_once() -> None:
    """The bookkeeping itself, on a hand-made ledger: 8 samples, 2 ranks, batch 2."""

    def line(e: int, s: int, r: int, ids: list[int], inc: str, t: float, w: int = 2) -> dict:
        return {"e": e, "s": s, "r": r, "w": w, "ids": ids, "inc": inc, "t": t, "pid": 1}

    first = [  # group A: steps 1-3 of epoch 0, then a kill -9 (step 3 never checkpointed)
        line(0, 1, 0, [0, 1], "A", 1.0),
        line(0, 1, 1, [2, 3], "A", 1.0),
        line(0, 2, 0, [4, 5], "A", 2.0),
        line(0, 2, 1, [6, 7], "A", 2.0),
        line(1, 3, 0, [7, 6], "A", 3.0),
        line(1, 3, 1, [5, 4], "A", 3.0),
    ]
    second = [  # group B restored step 2 and redid step 3 (world 1 now), then step 4-5
        line(1, 3, 0, [7, 6], "B", 5.0, w=1),
        line(1, 4, 0, [5, 4], "B", 6.0, w=1),
        line(1, 5, 0, [3, 2], "B", 7.0, w=1),
        line(1, 6, 0, [1, 0], "B", 8.0, w=1),
    ]
    book = chaos.analyze(first + second, [{"t": 4.0, "index": 0}], samples=8)
    assert book["steps"] == 6
    assert book["lost_by_fault"] == {-1: 0, 0: 1}
    assert book["missing"] == 0 and book["duplicates"] == 0
    assert book["incomplete_steps"] == [] and book["step_gaps"] == []
    # Without group B's redo, epoch 1 misses samples; a repeated sample is a duplicate.
    assert chaos.analyze(first, [], samples=8)["missing"] == 4
    dup = [*first[:4], line(1, 3, 0, [0, 0], "A", 3.0), line(1, 3, 1, [1, 2], "A", 3.0)]
    assert chaos.analyze(dup, [], samples=8)["duplicates"] >= 1
