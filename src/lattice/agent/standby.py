"""Pre-warmed standby interpreters: one per local rank, torch already imported.

Importing torch takes seconds; a re-formed round should not wait for it. While a round runs,
the agent keeps one idle interpreter per local rank that has imported torch and waits on a
pipe. When the next round starts it is handed the worker's environment, argv and cwd and runs
the script (see `_standby`). A standby that died or is missing is replaced by a fresh spawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from lattice.agent.output import Label, Sink
from lattice.agent.workers import Program, Worker, spawn_tied

log = logging.getLogger("lattice.agent")

# What a typical training script imports before its first step. torch.optim pulls in
# torch._dynamo (sympy, ~1.4 s) when the first optimizer is built, so it is warmed too.
PREWARM_MODULES = (
    "torch",
    "torch.distributed",
    "torch.nn.parallel",
    "torch.utils.data",
    "torch.optim",
    "torch._dynamo",
)
# Run by path, not as ``-m lattice...``: it needs only the standard library, so it works
# whatever PYTHONPATH the worker has.
_ENTRY = str(Path(__file__).with_name("_standby.py"))


def standby_env(env: Mapping[str, str], bootstrap: Path | None) -> dict[str, str]:
    """The standby's startup environment: the worker's, without the addon on PYTHONPATH.

    The addon's ``sitecustomize`` must see the round's environment, so the standby runs it only
    once it knows the round (a fresh worker would run it at startup, with that environment).
    """
    out = dict(env)
    if bootstrap is not None and "PYTHONPATH" in out:
        parts = [p for p in out["PYTHONPATH"].split(os.pathsep) if p and p != str(bootstrap)]
        if parts:
            out["PYTHONPATH"] = os.pathsep.join(parts)
        else:
            del out["PYTHONPATH"]
    return out


def sys_path0(program: Program) -> str:
    """What a fresh ``python -u SCRIPT`` / ``python -u -m MOD`` puts first on ``sys.path``."""
    cwd = os.path.realpath(program.cwd)
    if program.mode == "module":
        return cwd
    return os.path.dirname(os.path.realpath(os.path.join(cwd, program.target)))


class StandbyPool:
    """Keeps at most one standby per local rank; hands them out as workers."""

    def __init__(
        self,
        program: Program,
        node_envs: Sequence[Mapping[str, str]],
        bootstrap: Path | None,
        sinks: Callable[[int], tuple[Sink, Sink]],
        modules: Sequence[str] = PREWARM_MODULES,
    ) -> None:
        if program.mode == "exec":
            raise ValueError("a standby runs Python programs only")
        self._program = program
        self._envs = list(node_envs)
        self._bootstrap = bootstrap
        self._sinks = sinks
        self._modules = tuple(modules)
        self._ready: dict[int, Worker] = {}
        self._warm: dict[int, asyncio.Future[bool]] = {}
        self._refill: asyncio.Task[None] | None = None
        self._closed = False

    async def fill(self, *, idle: bool = True) -> None:
        """Start a standby for every local rank that has none (or whose standby died).

        ``idle``: import at idle CPU priority (while a round trains); False when nothing else
        runs yet (the agent's start).
        """
        for local_rank, env in enumerate(self._envs):
            current = self._ready.get(local_rank)
            if self._closed or (current is not None and current.returncode is None):
                continue
            program = self._program
            read_fd, write_fd = os.pipe()
            argv = [
                program.python,
                *program.python_flags,
                _ENTRY,
                str(write_fd),
                "1" if idle else "0",
                *self._modules,
            ]
            try:
                proc = await spawn_tied(
                    argv,
                    standby_env(env, self._bootstrap),
                    self._program.cwd,
                    stdin_pipe=True,
                    pass_fds=(write_fd,),
                )
            except OSError as exc:
                os.close(read_fd)
                log.warning("could not start a standby interpreter: %s", exc)
                return
            finally:
                os.close(write_fd)
            label = Label(f"standby{local_rank}")
            self._ready[local_rank] = Worker(proc, local_rank, label, self._sinks(local_rank))
            self._warm[local_rank] = _watch_ready(read_fd)

    async def wait_warm(self, timeout: float) -> bool:
        """Wait (bounded) until every standby has finished its imports; True if they all did."""
        waits = [f for f in self._warm.values() if not f.done()]
        if waits:
            await asyncio.wait(waits, timeout=timeout)
        return all(f.done() and f.result() for f in self._warm.values())

    def fill_later(self, delay_s: float) -> None:
        """Refill after ``delay_s``, so the standbys' imports don't slow a round's start."""
        if self._refill is not None and not self._refill.done():
            self._refill.cancel()

        async def _later() -> None:
            await asyncio.sleep(delay_s)
            await self.fill()

        self._refill = asyncio.create_task(_later())

    async def take(
        self, local_rank: int, env: Mapping[str, str], prepare: Callable[[Worker], None]
    ) -> Worker | None:
        """Turn the standby for ``local_rank`` into a worker with ``env``; None if unavailable.

        ``prepare`` runs before the standby is released (it sets the rank prefix of its output).
        """
        worker = self._ready.pop(local_rank, None)
        warm = self._warm.pop(local_rank, None)
        if warm is not None and not warm.done():
            warm.cancel()
        if worker is None or worker.returncode is not None:
            if worker is not None:
                _kill(worker)
            return None
        program = self._program
        msg = {
            "env": dict(env),
            "argv": [program.target, *program.args],
            "orig_argv": program.argv(),
            "cwd": program.cwd,
            "mode": program.mode,
            "target": program.target,
            "path0": sys_path0(program),
            "bootstrap": str(self._bootstrap) if _bootstrap_in(env, self._bootstrap) else None,
        }
        stdin = worker.proc.stdin
        assert stdin is not None
        prepare(worker)
        try:
            stdin.write(json.dumps(msg).encode() + b"\n")
            await stdin.drain()
            stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            _kill(worker)
            return None
        return worker

    async def close(self) -> None:
        self._closed = True
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refill
        for future in self._warm.values():
            if not future.done():
                future.cancel()
        self._warm.clear()
        for worker in self._ready.values():
            _kill(worker)
        for worker in self._ready.values():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(worker.wait(), 10.0)
            for task in worker.pumps:
                task.cancel()
        self._ready.clear()


def _watch_ready(fd: int) -> asyncio.Future[bool]:
    """A future that turns True when the standby writes to ``fd``, False if it closes it unread."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[bool] = loop.create_future()
    open_fd = [fd]

    def readable() -> None:
        try:
            data = os.read(fd, 1)
        except OSError:
            data = b""
        finish(bool(data))

    def finish(ok: bool) -> None:
        if open_fd:
            loop.remove_reader(open_fd.pop())
            os.close(fd)
        if not future.done():
            future.set_result(ok)

    loop.add_reader(fd, readable)
    future.add_done_callback(lambda f: finish(False) if f.cancelled() else None)
    return future


def _bootstrap_in(env: Mapping[str, str], bootstrap: Path | None) -> bool:
    if bootstrap is None:
        return False
    return str(bootstrap) in env.get("PYTHONPATH", "").split(os.pathsep)


def _kill(worker: Worker) -> None:
    worker.signal(signal.SIGKILL)
