"""Worker processes: tied to the agent's life, stopped within bounds, asked for safe points."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _agent_procs import alive, wait_until

from lattice.agent.output import Sink
from lattice.agent.protocol import CHECKPOINT_AND_EXIT, SAFEPOINT_EXIT
from lattice.agent.workers import Program, start_worker, stop_workers

FAKE_AGENT = r"""
import asyncio, os, sys
from lattice.agent.workers import spawn_tied

async def main():
    child = "import subprocess, sys, time; print(flush=True); time.sleep(600)"
    p = await spawn_tied([sys.executable, "-c", child], dict(os.environ), ".")
    await p.stdout.readline()  # the worker runs (past the trampoline)
    print(p.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_worker_dies_when_its_agent_is_killed_9(reaper: list[int]) -> None:
    agent = subprocess.Popen(
        [sys.executable, "-c", FAKE_AGENT], stdout=subprocess.PIPE, start_new_session=True
    )
    reaper.append(agent.pid)
    try:
        assert agent.stdout is not None
        line = agent.stdout.readline()  # bounded: the fake agent exits by itself within 600 s
        worker = int(line)
        reaper.append(worker)
        assert alive(worker)
        # Its own process group: a signal to the agent's group does not reach it.
        assert os.getpgid(worker) == worker != os.getpgid(agent.pid)
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(30)
        assert wait_until(lambda: not alive(worker), 30), "worker outlived its agent"
    finally:
        agent.kill()
        agent.wait(30)


def _sinks() -> tuple[Sink, Sink]:
    return Sink(None), Sink(None)


async def test_stop_escalates_from_sigterm_to_sigkill(tmp_path: Path) -> None:
    stubborn = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(600)"
    )
    polite = "import time; print('ready', flush=True); time.sleep(600)"
    programs = [
        Program("-c", (code,), "script", sys.executable, str(tmp_path))
        for code in (stubborn, polite)
    ]
    workers = [await start_worker(p, dict(os.environ), i, _sinks()) for i, p in enumerate(programs)]
    for w in workers:
        w.assign(w.local_rank, tmp_path / "logs")
    assert await asyncio.wait_for(_logged(tmp_path / "logs", 2), 60)
    started = time.monotonic()
    await stop_workers(workers, control_file=None, safepoint_timeout=30, kill_grace=0.5)
    assert time.monotonic() - started < 20
    assert workers[0].returncode == -signal.SIGKILL
    assert workers[1].returncode == -signal.SIGTERM


async def _logged(logs: Path, n: int) -> bool:
    while sum(1 for p in logs.glob("rank*/stdout.log") if p.read_bytes()) < n:
        await asyncio.sleep(0.05)
    return True


async def test_safe_point_request_reaches_the_worker(tmp_path: Path) -> None:
    control = tmp_path / "control"
    control.touch()
    code = (
        "import os, sys, time\n"
        "path = os.environ['LATTICE_CONTROL_FILE']\n"
        "while open(path).read().strip() != sys.argv[1]:\n"
        "    time.sleep(0.02)\n"
        f"sys.exit({SAFEPOINT_EXIT})\n"
    )
    script = tmp_path / "w.py"
    script.write_text(code)
    program = Program(str(script), (CHECKPOINT_AND_EXIT,), "script", sys.executable, str(tmp_path))
    env = {**os.environ, "LATTICE_CONTROL_FILE": str(control)}
    worker = await start_worker(program, env, 0, _sinks())
    started = time.monotonic()
    await stop_workers([worker], control_file=control, safepoint_timeout=60, kill_grace=1)
    assert worker.returncode == SAFEPOINT_EXIT
    assert time.monotonic() - started < 30


SAVER = """
import os, signal, sys, time
from lattice.agent.protocol import saving_marker

def on_term(*_):
    marker = saving_marker(os.environ["LATTICE_CONTROL_FILE"], os.getpid())
    marker.touch()  # as the addon does around its last save
    time.sleep(float(sys.argv[1]))  # the save: longer than the kill grace
    marker.unlink()
    os._exit(0)

signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize(("save_s", "save_grace", "code"), [(3, 60, 0), (600, 0.5, -9)])
async def test_a_worker_saving_its_state_gets_the_save_grace(
    tmp_path: Path, save_s: float, save_grace: float, code: int
) -> None:
    """Past the kill grace, a worker that marked itself saving is waited for (it finishes and
    exits 0), up to the save grace (then SIGKILL all the same)."""
    control = tmp_path / "round-1.control"
    control.touch()
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    program = Program(str(script), (str(save_s),), "script", sys.executable, str(tmp_path))
    env = {**os.environ, "LATTICE_CONTROL_FILE": str(control)}
    worker = await start_worker(program, env, 0, _sinks())
    worker.assign(0, tmp_path / "logs")
    assert await asyncio.wait_for(_logged(tmp_path / "logs", 1), 60)
    started = time.monotonic()
    await stop_workers(
        [worker],
        control_file=None,
        safepoint_timeout=30,
        kill_grace=1.0,
        saving=control,
        save_grace=save_grace,
    )
    assert worker.returncode == code
    assert time.monotonic() - started < 30
