"""The script's own loop state: step counters and ``for … in range(…)`` loops.

A step-count loop keeps its position in a local of the script (``step += 1``, or the iterator
of ``for step in range(N)``); a new process starts it again from 0, so without this a restored
run would make N more steps. At each batch fetch the addon reads the ``int`` locals of the
script's frames on the stack (not torch's, not the standard library's, not site-packages');
the ones that changed during the run are counters and go into the checkpoint. On restore:

- a counter (not a loop variable) is set back, in the frame running the same code, at the
  first batch fetched from the restored data position (``step = 0; while step < N`` resumes);
- a ``for`` variable over ``range(…)`` that changed between two fetches of one pass is a step
  loop (an epoch loop's changes only between passes). When the checkpoint was taken inside a
  step loop and every loop around the fetch is a ``range`` loop of the script, each of them is
  resumed by the ``range`` call that starts it again (the script's module sees a ``range`` that
  returns ``range(saved, stop, step)`` for that one call, the builtin otherwise) and each
  DataLoader's first pass is the checkpoint's. Otherwise loops are left to the fast-forwarded
  passes, as epoch loops are.

Only the main script's module gets that ``range``; loops in other modules resume counters only.
"""

from __future__ import annotations

import builtins
import ctypes
import dis
import functools
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import torch

CodeKey = tuple[str, str, int]
EVERY_FETCH = 16  # after the first ones, fetches observed (1 in N; checkpoints always observe)

# Instructions allowed between the ``range(…)`` call and the loop's GET_ITER: a wrapper call
# around it (``tqdm(range(n), desc=…)``) and its other arguments.
_BETWEEN = {
    "CACHE",
    "PRECALL",
    "CALL",
    "CALL_KW",
    "KW_NAMES",
    "PUSH_NULL",
    "LOAD_CONST",
    "LOAD_FAST",
    "LOAD_FAST_CHECK",
    "LOAD_GLOBAL",
    "LOAD_NAME",
    "LOAD_DEREF",
    "LOAD_ATTR",
}
_STORES = {"STORE_FAST", "STORE_NAME", "STORE_GLOBAL", "STORE_DEREF"}


def code_key(code: CodeType) -> CodeKey:
    return (code.co_filename, code.co_qualname, code.co_firstlineno)


@functools.cache
def _library_roots() -> tuple[str, ...]:
    import torch

    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    roots.add(str(Path(torch.__file__).parent))
    roots.add(str(Path(__file__).resolve().parents[1]))  # lattice itself
    return tuple(sorted(str(Path(r).resolve()) + "/" for r in roots))


@functools.cache
def _is_user_file(filename: str) -> bool:
    if filename.startswith("<"):
        return False  # <frozen …>, <string>
    return not str(Path(filename).resolve()).startswith(_library_roots())


def user_frames(start: FrameType | None) -> list[FrameType]:
    """The script's frames from ``start`` outwards (innermost first)."""
    found = []
    frame = start
    while frame is not None:
        if _is_user_file(frame.f_code.co_filename):
            found.append(frame)
        frame = frame.f_back
    return found


@functools.cache
def _instructions(code: CodeType) -> list[dis.Instruction]:
    return list(dis.get_instructions(code))


@functools.cache
def _for_loops(code: CodeType) -> list[tuple[int, int, list[str]]]:
    """Each ``for`` statement in ``code``: (FOR_ITER offset, end offset, names it assigns)."""
    ins = _instructions(code)
    loops = []
    for i, op in enumerate(ins):
        if op.opname != "FOR_ITER" or i + 1 >= len(ins):
            continue
        nxt, names = ins[i + 1], []
        if nxt.opname in _STORES:
            names = [str(nxt.argval)]
        elif nxt.opname == "UNPACK_SEQUENCE":
            stores = ins[i + 2 : i + 2 + nxt.argval]
            names = [str(o.argval) for o in stores if o.opname in _STORES]
        loops.append((op.offset, int(op.argval), names))
    return loops


@functools.cache
def loop_targets(code: CodeType) -> frozenset[str]:
    """Names a ``for`` statement in ``code`` assigns (driven by their iterator, not by us)."""
    return frozenset(n for _, _, names in _for_loops(code) for n in names)


def _current(code: CodeType, offset: int) -> int | None:
    """The offset of the instruction running at ``f_lasti`` (which may point into its cache)."""
    return max((op.offset for op in _instructions(code) if op.offset <= offset), default=None)


@functools.cache
def active_targets(code: CodeType, offset: int) -> frozenset[str]:
    """Names assigned by the ``for`` statements whose body holds the instruction at ``offset``.

    The loop whose own FOR_ITER is running (it is fetching the next batch) is not counted.
    """
    at = _current(code, offset)
    if at is None:
        return frozenset()
    loops = _for_loops(code)
    return frozenset(n for start, end, names in loops if start < at < end for n in names)


@functools.cache
def running_targets(code: CodeType, offset: int) -> frozenset[str]:
    """`active_targets` and those of the loop whose FOR_ITER is running (the fetching one)."""
    at = _current(code, offset)
    if at is None:
        return frozenset()
    loops = _for_loops(code)
    return frozenset(n for start, end, names in loops if start <= at < end for n in names)


@functools.cache
def range_target(code: CodeType, offset: int) -> str | None:
    """The loop variable of ``for NAME in [wrapper(]range(…)[)]`` whose call is at ``offset``."""
    ins = _instructions(code)
    current = _current(code, offset)
    at = next((i for i, op in enumerate(ins) if op.offset == current), None)
    if at is None or ins[at].opname not in ("CALL", "CALL_KW"):
        return None
    for i in range(at + 1, min(at + 16, len(ins) - 2)):
        op = ins[i]
        if op.opname == "GET_ITER":
            loop, store = ins[i + 1], ins[i + 2]
            if loop.opname == "FOR_ITER" and store.opname in _STORES:
                return str(store.argval)
            return None
        if op.opname not in _BETWEEN:
            return None
    return None


SMALL_DICT = 64  # a dict local with at most this many entries has its int entries watched


def _ints(frame: FrameType) -> dict[str, int]:
    """The frame's ``int`` locals, and the ``int`` entries of its small dicts keyed by str
    (LitGPT keeps its counters in ``state["iter_num"]``), named ``state['iter_num']``."""
    found = {}
    for k, v in frame.f_locals.items():
        if type(v) is int:
            found[k] = v
        elif type(v) is dict and len(v) <= SMALL_DICT:
            for key, value in v.items():
                if type(key) is str and key.isidentifier() and type(value) is int:
                    found[f"{k}[{key!r}]"] = value
    return found


def _entry(name: str) -> tuple[str, str] | None:
    """``("state", "iter_num")`` for a dict entry's name (`_ints`), None for a plain local."""
    if not name.endswith("']") or "['" not in name:
        return None
    local, _, key = name[:-2].partition("['")
    return local, key


def get_local(frame: FrameType, name: str) -> Any:
    entry = _entry(name)
    if entry is None:
        return frame.f_locals.get(name)
    holder = frame.f_locals.get(entry[0])
    return holder.get(entry[1]) if type(holder) is dict else None


def set_local(frame: FrameType, name: str, value: Any) -> None:
    """Assign a local of a running frame (a module frame's locals are its globals), or an
    entry of a dict local (`_ints`: set in the dict itself, where the frame holds it)."""
    entry = _entry(name)
    if entry is not None:
        holder = frame.f_locals.get(entry[0])
        if type(holder) is dict:
            holder[entry[1]] = value
        return
    frame.f_locals[name] = value
    if sys.version_info < (3, 13) and frame.f_code.co_flags & 0x01:  # CO_OPTIMIZED: a function
        # Before 3.13 f_locals is a copy: write it back into the frame's fast locals.
        ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))


class LoopState:
    """Which script locals are counters and step loops, and restoring them (module docstring)."""

    def __init__(self) -> None:
        self.first: dict[CodeKey, dict[str, int]] = {}
        self.last: dict[CodeKey, tuple[Any, dict[str, int]]] = {}
        self.varying: dict[CodeKey, set[str]] = {}
        self.in_pass: dict[CodeKey, set[str]] = {}
        # Loop targets seen changing where no loop assigning them was running: a ``for``
        # elsewhere in the code shares the name of a counter (``for it in …`` at the top,
        # ``it += 1`` in the training loop).
        self.assigned: dict[CodeKey, set[str]] = {}
        self.range_loops: set[tuple[CodeKey, str]] = set()  # ``for NAME in range(…)`` seen
        self.counters: dict[CodeKey, dict[str, int]] = {}  # restored, set at the first fetch
        self.ranges: dict[tuple[CodeKey, str], int] = {}  # restored, for the range calls
        self.jump = False  # restored a step loop: its range calls resume, passes are skipped
        self.fetches = 0
        self.pass_key: Any = None  # the pass of the latest fetch
        self.resumed: list[str] = []  # range loops resumed, for the log
        # Called as a ``for … in range(…)`` loop of the main script starts, before it is
        # resumed: the runtime may restore there (a script without a DataLoader).
        self.on_loop_start: Callable[[], None] | None = None

    def fetched(self, start: FrameType | None, pass_key: Any) -> None:
        """A batch fetch: observed when it is one of the first or one in `EVERY_FETCH`.

        Reading the locals costs tens of microseconds; the classification is sticky and a
        checkpoint observes anyway, so sampling loses nothing.
        """
        self.fetches += 1
        self.pass_key = pass_key
        if self.fetches <= EVERY_FETCH or self.fetches % EVERY_FETCH == 0:
            self.observe(start, pass_key)

    def observe(self, start: FrameType | None, pass_key: Any) -> None:
        """Record the script's int locals at a batch fetch of the pass ``pass_key``.

        Runs at every fetch: only the locals that changed since the last fetch are looked at
        one by one (set operations on the dicts' items find them).
        """
        for frame in user_frames(start):
            key = code_key(frame.f_code)
            now = _ints(frame)
            last = self.last.get(key)
            self.last[key] = (pass_key, now)
            if last is None:
                self.first[key] = dict(now)
                continue
            changed = now.items() - last[1].items()
            if not changed:
                continue
            first = self.first[key]
            varying = self.varying.setdefault(key, set())
            same_pass = last[0] == pass_key
            targets = loop_targets(frame.f_code)
            running = running_targets(frame.f_code, frame.f_lasti) if targets else frozenset()
            for name, value in changed:
                if first.setdefault(name, value) != value:
                    varying.add(name)
                if same_pass and name in last[1]:
                    self.in_pass.setdefault(key, set()).add(name)
                if same_pass and name in last[1] and name in targets and name not in running:
                    self.assigned.setdefault(key, set()).add(name)

    def capture(self, start: FrameType | None) -> list[dict[str, Any]]:
        """The counters and loop variables of the script's frames on the stack."""
        self.observe(start, self.pass_key)
        saved = []
        for frame in user_frames(start):
            key = code_key(frame.f_code)
            varying = self.varying.get(key, set())
            targets = loop_targets(frame.f_code)
            active = active_targets(frame.f_code, frame.f_lasti)
            in_pass = self.in_pass.get(key, set())
            assigned = self.assigned.get(key, set())
            counters, ranges, steps, unknown = {}, {}, [], False
            for name, value in _ints(frame).items():
                if name not in varying:
                    continue
                if name not in targets or (name in assigned and name not in active):
                    counters[name] = value
                elif name not in active:
                    continue  # a finished loop's variable
                elif (key, name) in self.range_loops:
                    ranges[name] = value
                    if name in in_pass:
                        steps.append(name)
                else:  # a loop around the fetch the addon cannot resume
                    unknown = True
            if counters or ranges or unknown:
                saved.append(
                    {
                        "code": list(key),
                        "counters": counters,
                        "ranges": ranges,
                        "steps": steps,
                        "unknown": unknown,
                    }
                )
        return saved

    def load(self, saved: list[dict[str, Any]]) -> list[str]:
        """Take a checkpoint's loop state; what cannot be resumed, for the log.

        Range loops are resumed only when the checkpoint was taken inside a step loop (a range
        variable that changed between fetches of one pass) and every loop around it is a range
        loop of the script (``jump``): the data loaders then go straight to the checkpoint's
        pass. Otherwise epoch loops are resumed as before, by fast-forwarded passes.
        """
        ranges: dict[tuple[CodeKey, str], int] = {}
        steps, unknown = [], False
        for entry in saved:
            file, qualname, line = entry["code"]
            key = (str(file), str(qualname), int(line))
            if entry["counters"]:
                self.counters[key] = {str(k): int(v) for k, v in entry["counters"].items()}
                self.varying.setdefault(key, set()).update(self.counters[key])
            for name, value in entry["ranges"].items():
                ranges[(key, str(name))] = int(value)
            steps += [f"{name} in {qualname} ({file}:{line})" for name in entry["steps"]]
            unknown = unknown or bool(entry["unknown"])
        self.jump = bool(steps) and not unknown
        if not self.jump:
            return [f"{s}: the loop around it is not a range loop" for s in steps]
        self.ranges = ranges
        for key, name in ranges:
            self.varying.setdefault(key, set()).add(name)
        return []

    def resume_range(self, frame: FrameType, made: range) -> range:
        """``made`` or, for the call that starts a restored loop again, its remainder."""
        name = range_target(frame.f_code, frame.f_lasti)
        if name is None:
            return made
        if self.on_loop_start is not None:
            self.on_loop_start()
        key = code_key(frame.f_code)
        self.range_loops.add((key, name))
        value = self.ranges.pop((key, name), None)
        if value is None or value not in made:
            return made
        self.resumed.append(f"{name}={value}")
        return builtins.range(value, made.stop, made.step)

    def apply(self, start: FrameType | None) -> tuple[list[str], list[str]]:
        """Set the restored counters in the frames running their code.

        Returns what was set, and the restored range loops whose ``range`` call was not seen
        (started before the restore): both for the log.
        """
        done, self.resumed = self.resumed, []
        for frame in user_frames(start):
            key = code_key(frame.f_code)
            for name, value in self.counters.pop(key, {}).items():
                if get_local(frame, name) != value:
                    set_local(frame, name, value)
                done.append(f"{name}={value}")
        missed = [f"{name}={value} in {key[1]}" for (key, name), value in self.ranges.items()]
        self.ranges.clear()
        self.counters.clear()
        return done, missed


class _ResumingRange:
    """The script module's ``range``: an object, not a class, so that ``torch.compile`` inlines
    a call to it without a graph break (dynamo cannot build an instance of a class whose
    ``__new__`` returns another type); ``isinstance(x, range)`` keeps working."""

    def __init__(self, state: LoopState) -> None:
        self._state = state

    def __call__(self, *args: Any) -> builtins.range:
        made = builtins.range(*args)
        if torch.compiler.is_compiling():  # a loop in a compiled forward: not a step loop
            return made
        return self._state.resume_range(sys._getframe(1), made)

    def __instancecheck__(self, obj: object) -> bool:
        return isinstance(obj, builtins.range)

    def __subclasscheck__(self, sub: type) -> bool:
        return issubclass(sub, builtins.range)


def install_range(main_globals: dict[str, Any], state: LoopState) -> None:
    """Give the script's module a ``range`` that resumes restored step loops (see above)."""
    if "range" not in main_globals:
        main_globals["range"] = _ResumingRange(state)
