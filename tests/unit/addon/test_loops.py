"""The script's loop state: which locals are counters and step loops, and setting them back."""

from __future__ import annotations

import builtins
import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import torch

from lattice.addon import loops


def _frame() -> FrameType:
    return sys._getframe(1)


def _where() -> tuple[Any, int]:
    caller = sys._getframe(1)
    return caller.f_code, caller.f_lasti


class Probe:
    """Stands in for the addon: records the caller's frame at each fetch, like `_counting`."""

    def __init__(self, state: loops.LoopState, apply: bool = False) -> None:
        self.state = state
        self.apply = apply
        self.saved: list[Any] = []
        self.pass_no = 0

    def fetches(self, n: int, capture_at: int | None = None) -> Iterator[int]:
        self.pass_no += 1
        for i in range(n):
            frame = sys._getframe(1)
            if self.apply:
                self.applied = self.state.apply(frame)
                self.apply = False
            self.state.fetched(frame, self.pass_no)
            if i == capture_at:
                self.saved = self.state.capture(frame)
            yield i


def resumed(saved: list[Any]) -> Probe:
    """A restarted process's probe: a state loaded from ``saved``, applied at its first fetch."""
    state = loops.LoopState()
    state.load(saved)
    return Probe(state, apply=True)


def test_loop_targets_and_active_loops() -> None:
    def script(n: int) -> list[tuple[Any, int]]:
        where = []
        total = 0
        for _epoch in range(n):
            for i, _x in enumerate("ab"):
                total += i
                where.append(_where())  # inside both loops
            where.append(_where())  # inside `epoch`, after the `i` loop
        where.append(_where())  # after both
        return where

    (code, both), (_, inside), (_, after) = script(1)[1:]
    assert loops.loop_targets(code) == {"_epoch", "i", "_x"}
    assert loops.active_targets(code, both) == {"_epoch", "i", "_x"}
    assert loops.active_targets(code, inside) == {"_epoch"}
    assert loops.active_targets(code, after) == frozenset()


def test_range_target_finds_the_loop_variable_even_through_a_wrapper() -> None:
    seen: list[str | None] = []

    def spy(*args: int) -> range:
        caller = sys._getframe(1)
        seen.append(loops.range_target(caller.f_code, caller.f_lasti))
        return builtins.range(*args)

    def wrap(r: range, desc: str = "") -> range:
        return r

    def script(range: Callable[..., range]) -> None:
        for _step in range(2):
            pass
        for _inner in wrap(range(1), desc="x"):
            pass
        assert list(range(3))  # not a loop
        for _a, _b in zip(range(1), "a", strict=True):  # unpacked: not a step loop
            pass

    script(spy)
    assert seen == ["_step", "_inner", None, None]


def test_a_while_counter_is_saved_and_set_back_at_the_first_fetch() -> None:
    state = loops.LoopState()
    probe = Probe(state)

    def script(stop: int, capture_at: int | None) -> int:
        step = 0
        world = 2  # constant: never saved
        while step < stop:
            for _ in probe.fetches(4, capture_at):
                step += 1
                if step >= stop:
                    break
        return step + world - world

    script(6, capture_at=1)  # second pass: fetch 1 after 5 steps
    (entry,) = probe.saved
    assert entry["counters"] == {"step": 5}
    assert entry["ranges"] == {} and not entry["unknown"]

    restored = loops.LoopState()
    assert restored.load(probe.saved) == []
    assert not restored.jump  # no range loop: passes are fast-forwarded, not skipped
    probe = Probe(restored, apply=True)
    assert script(6, capture_at=None) == 6  # set to 5 at the first fetch: one more step
    assert probe.applied == (["step=5"], [])


def test_a_counter_in_a_dict_is_saved_and_set_back() -> None:
    """LitGPT keeps its counters in a dict local (``state["iter_num"] += 1``): the entry is a
    counter like an int local; a constant entry, a non-identifier key and a big dict are not."""
    state = loops.LoopState()
    probe = Probe(state)
    big = {f"k{i}": i for i in range(loops.SMALL_DICT + 1)}

    def script(stop: int, capture_at: int | None) -> dict[str, Any]:
        counts = {"iter_num": 0, "world": 2, "odd key": 0, "model": object()}
        while counts["iter_num"] < stop:
            for _ in probe.fetches(4, capture_at):
                counts["iter_num"] += 1
                counts["odd key"] += 1
                big["k0"] += 1
                if counts["iter_num"] >= stop:
                    break
        return counts

    script(6, capture_at=1)
    (entry,) = probe.saved
    assert entry["counters"] == {"counts['iter_num']": 5}
    probe = resumed(probe.saved)
    assert script(6, capture_at=None)["iter_num"] == 6  # set to 5 at the first fetch
    assert probe.applied == (["counts['iter_num']=5"], [])


def test_a_compiled_forward_calls_the_scripts_range_without_a_graph_break() -> None:
    """A model defined in the main script loops with its ``range`` in ``forward``: under
    ``torch.compile(fullgraph=True)`` that must trace (a break would fail that compile, and
    slow any other)."""
    main: dict[str, Any] = {}
    exec("def forward(x):\n    for i in range(3):\n        x = x + i\n    return x\n", main)
    loops.install_range(main, loops.LoopState())
    compiled = torch.compile(main["forward"], fullgraph=True, backend="eager")
    assert torch.equal(compiled(torch.zeros(2)), torch.full((2,), 3.0))
    assert issubclass(builtins.range, main["range"])


def test_a_range_step_loop_is_resumed_by_its_range_call() -> None:
    state = loops.LoopState()
    probe = Probe(state)
    main: dict[str, Any] = {}
    loops.install_range(main, state)
    assert isinstance(builtins.range(1), main["range"])
    assert main["range"](2, 5) == builtins.range(2, 5)

    def script(range: Any, stop: int, capture_at: int | None) -> list[int]:
        it = probe.fetches(100, capture_at)
        steps = []
        for step in range(stop):
            next(it)
            steps.append(step)
        return steps

    assert script(main["range"], 5, capture_at=3) == [0, 1, 2, 3, 4]
    (entry,) = probe.saved
    assert entry["ranges"] == {"step": 3} and entry["steps"] == ["step"]

    restored = loops.LoopState()
    assert restored.load(probe.saved) == []
    assert restored.jump
    again: dict[str, Any] = {}
    loops.install_range(again, restored)
    assert script(again["range"], 5, capture_at=None) == [3, 4]
    assert restored.apply(_frame()) == (["step=3"], [])
    assert script(again["range"], 5, capture_at=None) == [0, 1, 2, 3, 4]  # once only


def test_an_epoch_range_is_left_to_the_fast_forwarded_passes() -> None:
    state = loops.LoopState()
    probe = Probe(state)
    main: dict[str, Any] = {}
    loops.install_range(main, state)

    def script(range: Any, capture_epoch: int) -> None:
        global_step = 0
        for epoch in range(3):
            for _ in probe.fetches(3, 1 if epoch == capture_epoch else None):
                global_step += 1

    script(main["range"], capture_epoch=1)
    (entry,) = probe.saved
    assert entry["ranges"] == {"epoch": 1} and entry["steps"] == []
    assert entry["counters"] == {"global_step": 4}
    restored = loops.LoopState()
    restored.load(probe.saved)
    assert not restored.jump and restored.ranges == {}


def test_a_step_range_inside_a_loop_it_cannot_resume_is_reported_not_resumed() -> None:
    state = loops.LoopState()
    probe = Probe(state)
    main: dict[str, Any] = {}
    loops.install_range(main, state)

    def script(range: Any) -> None:
        it = probe.fetches(100, capture_at=4)
        for epoch in iter([0, 1]):
            for step in range(3):
                next(it)
                assert (epoch, step) != (9, 9)

    script(main["range"])
    (entry,) = probe.saved
    assert entry["unknown"] and entry["steps"] == ["step"]
    restored = loops.LoopState()
    (line,) = restored.load(probe.saved)
    assert "step in" in line and not restored.jump


def test_set_local_writes_a_running_function_frame() -> None:
    def script() -> int:
        step = 0
        loops.set_local(sys._getframe(), "step", 7)
        return step

    assert script() == 7


def test_the_loop_that_fetches_is_not_a_loop_to_resume() -> None:
    state = loops.LoopState()
    probe = Probe(state)

    def script() -> int:
        step = 0
        for i, _ in enumerate(probe.fetches(4, capture_at=2)):
            step += i
        return step

    script()
    (entry,) = probe.saved
    assert entry == {
        "code": list(entry["code"]),
        "counters": {"step": 1},
        "ranges": {},
        "steps": [],
        "unknown": False,
    }


def test_fetches_are_sampled_but_a_checkpoint_sees_every_change() -> None:
    state = loops.LoopState()
    probe = Probe(state)

    def script() -> int:
        late = 0  # starts counting long after the fetches stop being observed one by one
        for i in probe.fetches(40, capture_at=loops.EVERY_FETCH + 5):
            if i >= loops.EVERY_FETCH + 2:
                late += 1
        return late

    script()
    assert state.fetches == 40
    (entry,) = probe.saved
    assert entry["counters"] == {"late": 3}


def test_a_counter_sharing_its_name_with_a_for_variable_is_still_a_counter() -> None:
    """``for it in range(3)`` (a warm-up) and later ``it += 1`` in the training loop: the
    name is a loop target of the code, yet it changes in a pass where no loop assigns it."""
    state = loops.LoopState()
    probe = Probe(state)

    def script(stop: int, capture_at: int | None) -> int:
        for it in range(3):  # noqa: B007 - the warm-up's variable, reused below
            pass
        it = 0
        while it < stop:
            for _ in probe.fetches(4, capture_at):
                it += 1
                if it >= stop:
                    break
        return it

    script(6, capture_at=1)
    (entry,) = probe.saved
    assert entry["counters"] == {"it": 5}
    probe = resumed(probe.saved)
    assert script(6, capture_at=None) == 6
    assert probe.applied == (["it=5"], [])


def test_a_finished_loops_variable_is_not_a_counter() -> None:
    """A loop that ended before the fetch keeps its last value, which changes from pass to
    pass only (a different length each time): not a counter."""
    state = loops.LoopState()
    probe = Probe(state)

    def script() -> None:
        for epoch in range(3):
            for k in range(epoch + 1):  # noqa: B007 - ends before the fetch
                pass
            for _ in probe.fetches(3, capture_at=1 if epoch == 2 else None):
                pass

    script()
    assert all(not entry["counters"] for entry in probe.saved)
