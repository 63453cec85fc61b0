"""Worker processes: how they are started, tied to the agent, watched and stopped.

Every worker runs in its own process group (its DataLoader children go with it) and carries
PR_SET_PDEATHSIG=SIGKILL (see `_trampoline`), so an agent killed -9 leaves nothing behind.
The agent never waits on a worker without a bound: stopping escalates to SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lattice.agent.output import Label, LastLine, Sink, pump
from lattice.agent.protocol import CHECKPOINT_AND_EXIT, saving_marker

log = logging.getLogger("lattice.agent")

TRAMPOLINE = Path(__file__).with_name("_trampoline.py")
DRAIN_S = 2.0  # after exit, how long output may still trickle in (grandchildren holding pipes)
KILL_WAIT_S = 10.0  # after SIGKILL, how long to wait for the kernel to reap
POLL_S = 0.2  # how often a saving worker's marker is looked at again


@dataclass(frozen=True)
class Program:
    """What each worker runs, as torchrun would: ``python -u SCRIPT``, ``-m MOD`` or raw."""

    target: str
    args: tuple[str, ...]
    mode: str = "script"  # script | module | exec
    python: str = sys.executable
    cwd: str = "."
    python_flags: tuple[str, ...] = ("-u",)

    def argv(self) -> list[str]:
        if self.mode == "exec":
            return [self.target, *self.args]
        if self.mode == "module":
            return [self.python, *self.python_flags, "-m", self.target, *self.args]
        return [self.python, *self.python_flags, self.target, *self.args]


_PYTHON_NAME = re.compile(r"python(\d+(\.\d+)?)?")
_SAFE_FLAGS = frozenset({"-u"})


def as_python_program(command: Sequence[str], cwd: str) -> Program | None:
    """Recognise ``python [-u] SCRIPT|-m MOD ARGS`` run with this very environment's Python.

    ``--no-python python -u train.py`` (how the operator wraps a container command) can then
    use standby interpreters, which need the agent's own Python environment.
    """
    if len(command) < 2 or not _PYTHON_NAME.fullmatch(os.path.basename(command[0])):
        return None
    found = shutil.which(command[0])
    if found is None or os.path.dirname(os.path.abspath(found)) != os.path.dirname(sys.executable):
        return None
    flags: list[str] = []
    rest = list(command[1:])
    while rest and rest[0] in _SAFE_FLAGS:
        flags.append(rest.pop(0))
    if len(rest) >= 2 and rest[0] == "-m":
        return Program(rest[1], tuple(rest[2:]), "module", command[0], cwd, tuple(flags))
    if rest and not rest[0].startswith("-"):
        return Program(rest[0], tuple(rest[1:]), "script", command[0], cwd, tuple(flags))
    return None


async def spawn_tied(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str,
    *,
    stdin_pipe: bool = False,
    pass_fds: tuple[int, ...] = (),
) -> asyncio.subprocess.Process:
    """Start ``argv`` in a new session, killed by the kernel if this process dies."""
    cmd = [sys.executable, "-S", "-I", str(TRAMPOLINE), str(os.getpid()), *argv]
    return await asyncio.create_subprocess_exec(
        *cmd,
        env=dict(env),
        cwd=cwd,
        stdin=asyncio.subprocess.PIPE if stdin_pipe else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        pass_fds=pass_fds,
    )


def signal_group(pid: int, sig: int) -> None:
    """Signal a worker's whole process group; gone already is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Worker:
    """One running training process (started fresh or from a standby) and its output pumps."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        local_rank: int,
        label: Label,
        sinks: tuple[Sink, Sink],
    ) -> None:
        self.proc = proc
        self.local_rank = local_rank
        self.rank = -1
        self.label = label
        self.sinks = sinks
        assert proc.stdout is not None and proc.stderr is not None
        self.last_error = LastLine()  # the last stderr line: named when the worker fails
        self.pumps = [
            asyncio.create_task(pump(proc.stdout, label, sinks[0])),
            asyncio.create_task(pump(proc.stderr, label, sinks[1], self.last_error)),
        ]

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def assign(self, rank: int, log_dir: Path | None) -> None:
        """Give the worker its global rank for this round (prefix and log files follow)."""
        self.rank = rank
        self.label.set(f"rank{rank}")
        for sink, name in zip(self.sinks, ("stdout", "stderr"), strict=True):
            sink.set_log(None if log_dir is None else log_dir / f"rank{rank}" / f"{name}.log")

    def signal(self, sig: int) -> None:
        signal_group(self.pid, sig)

    async def wait(self) -> int:
        return await self.proc.wait()


async def start_worker(
    program: Program,
    env: Mapping[str, str],
    local_rank: int,
    streams: tuple[Sink, Sink],
) -> Worker:
    proc = await spawn_tied(program.argv(), env, program.cwd)
    return Worker(proc, local_rank, Label(f"local{local_rank}"), streams)


def write_control(path: Path, command: str) -> None:
    """Atomically replace the control file's content (the addon polls it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(command + "\n")
    os.replace(tmp, path)


async def wait_all(workers: Iterable[Worker], timeout: float) -> bool:
    """Wait until every worker has exited or ``timeout`` passes; True if all exited."""
    waits = [asyncio.ensure_future(w.wait()) for w in workers if w.returncode is None]
    if not waits:
        return True
    _, pending = await asyncio.wait(waits, timeout=timeout)
    for task in pending:
        task.cancel()
    return not pending


async def _wait_for_saves(workers: Sequence[Worker], saving: Path, bound: float) -> None:
    deadline = time.monotonic() + bound
    said = False
    while True:
        savers = [
            w for w in workers if w.returncode is None and saving_marker(saving, w.pid).exists()
        ]
        left = deadline - time.monotonic()
        if not savers or left <= 0:
            return
        if not said:
            said = True
            log.info("waiting up to %.0f s for %d worker(s) saving their state", left, len(savers))
        await wait_all(savers, min(POLL_S, left))


async def stop_workers(
    workers: Sequence[Worker],
    *,
    control_file: Path | None,
    safepoint_timeout: float,
    kill_grace: float,
    saving: Path | None = None,
    save_grace: float = 0.0,
) -> None:
    """Stop all workers, bounded: safe point (if ``control_file``), SIGTERM, then SIGKILL.

    A worker still saving its last step when the kill grace ends (its `saving_marker` next to
    the round's control file ``saving``) gets up to ``save_grace`` more: a multi-gigabyte
    state takes longer than the few seconds that suit a worker with nothing to save.
    """
    started = time.monotonic()
    if control_file is not None and any(w.returncode is None for w in workers):
        write_control(control_file, CHECKPOINT_AND_EXIT)
        if not await wait_all(workers, safepoint_timeout):
            log.warning(
                "workers did not reach a safe point in %.0f s; terminating", safepoint_timeout
            )
    for sig, bound in ((signal.SIGTERM, kill_grace), (signal.SIGKILL, KILL_WAIT_S)):
        alive = [w for w in workers if w.returncode is None]
        if not alive:
            break
        for w in alive:
            w.signal(sig)
        await wait_all(alive, bound)
        if sig == signal.SIGTERM and saving is not None:
            await _wait_for_saves(workers, saving, save_grace)
    for w in workers:  # stragglers of the group (DataLoader workers, shells) go too
        w.signal(signal.SIGKILL)
    pumps = [t for w in workers for t in w.pumps if not t.done()]
    if pumps:
        _, late = await asyncio.wait(pumps, timeout=DRAIN_S)
        for task in late:
            task.cancel()
    log.debug("stopped %d workers in %.2f s", len(workers), time.monotonic() - started)
