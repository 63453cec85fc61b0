"""A standby interpreter must look exactly like the fresh process it replaces."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from lattice.agent.output import Sink, drain_all
from lattice.agent.standby import StandbyPool
from lattice.agent.workers import Program, Worker, start_worker

PROBE = r"""
import json, os, sys
import __main__
out = {
    "environ": dict(os.environ),
    "argv": sys.argv,
    "orig_argv": sys.orig_argv,
    "cwd": os.getcwd(),
    "path": sys.path,
    "name": __name__,
    "file": __file__,
    "main_file": getattr(sys.modules["__main__"], "__file__", None),
    "stdin_devnull": os.fstat(0).st_rdev == os.stat(os.devnull).st_rdev,
    "unbuffered": sys.flags.unbuffered if hasattr(sys.flags, "unbuffered") else None,
    "sitecustomize_rank": getattr(sys, "_probe_rank", None),
    "sched": (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)),
}
with open(os.environ["PROBE_OUT"], "w") as f:
    json.dump(out, f)
print("probe says hi", flush=True)
sys.exit(int(os.environ.get("PROBE_EXIT", "0")))
"""

# The addon's sitecustomize must run with the round's environment in both cases.
SITECUSTOMIZE = "import os, sys\nsys._probe_rank = os.environ.get('RANK')\n"


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    real = tmp_path / "real"
    real.mkdir()
    (real / "probe.py").write_text(PROBE)
    (real / "probe_mod.py").write_text(PROBE)
    (tmp_path / "link").symlink_to(real)
    boot = tmp_path / "_bootstrap"
    boot.mkdir()
    (boot / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"root": tmp_path, "real": real, "boot": boot}


def _sinks(_: int) -> tuple[Sink, Sink]:
    return Sink(sys.stdout.buffer), Sink(sys.stderr.buffer)


async def _result(worker: Worker) -> int:
    return await asyncio.wait_for(worker.wait(), 60)


def _envs(
    layout: dict[str, Path], name: str, extra: dict[str, str] | None = None
) -> tuple[dict[str, str], dict[str, str]]:
    node = {
        **(extra or {}),
        "PATH": os.environ.get("PATH", "/usr/bin"),
        "LOCAL_RANK": "0",
        "PYTHONPATH": f"{layout['boot']}{os.pathsep}{layout['root']}",
        "PROBE_EXIT": "3",
        "ODD": "a=b\nc",
    }
    full = {**node, "RANK": "5", "PROBE_OUT": str(layout["root"] / name)}
    return node, full


@pytest.mark.parametrize(
    ("mode", "target", "cwd_key", "flags", "extra"),
    [
        ("script", "link/probe.py", "root", ("-u",), {}),
        ("module", "probe_mod", "real", ("-u",), {}),
        ("script", "real/probe.py", "root", (), {}),
        ("script", "real/probe.py", "root", ("-u",), {"PYTHONSAFEPATH": "1"}),
    ],
)
async def test_standby_is_indistinguishable_from_a_fresh_process(
    layout: dict[str, Path],
    mode: str,
    target: str,
    cwd_key: str,
    flags: tuple[str, ...],
    extra: dict[str, str],
) -> None:
    program = Program(
        target, ("--lr", "0.1", "x y"), mode, sys.executable, str(layout[cwd_key]), flags
    )
    node, fresh_env = _envs(layout, "fresh.json", extra)
    fresh = await start_worker(program, fresh_env, 0, _sinks(0))
    fresh.assign(5, None)
    assert await _result(fresh) == 3

    pool = StandbyPool(program, [node], layout["boot"], _sinks, modules=("json",))
    await pool.fill()
    _, warm_env = _envs(layout, "warm.json", extra)
    warm = await pool.take(0, warm_env, lambda w: w.assign(5, None))
    assert warm is not None
    assert await _result(warm) == 3
    await pool.close()

    a = json.loads((layout["root"] / "fresh.json").read_text())
    b = json.loads((layout["root"] / "warm.json").read_text())
    a["environ"].pop("PROBE_OUT")
    b["environ"].pop("PROBE_OUT")
    assert a == b
    assert a["sitecustomize_rank"] == "5"
    assert a["stdin_devnull"] is True
    assert a["argv"][1:] == ["--lr", "0.1", "x y"]
    assert a["name"] == "__main__"


async def test_dead_standby_falls_back_and_eof_exits_quietly(layout: dict[str, Path]) -> None:
    program = Program("link/probe.py", (), "script", sys.executable, str(layout["root"]))
    node, full = _envs(layout, "x.json")
    pool = StandbyPool(program, [node], None, _sinks, modules=())
    await pool.fill()
    standby = pool._ready[0]
    standby.signal(9)
    await asyncio.wait_for(standby.wait(), 30)
    assert await pool.take(0, full, lambda w: None) is None
    await pool.fill()
    assert pool._ready[0].returncode is None
    await pool.close()
    assert all(w.returncode is not None for w in [standby])


async def test_uncaught_exception_looks_the_same(tmp_path: Path) -> None:
    import io

    (tmp_path / "boom.py").write_text("def f():\n    raise ValueError('boom')\n\nf()\n")
    program = Program("boom.py", (), "script", sys.executable, str(tmp_path))
    env = {"PATH": os.environ.get("PATH", ""), "LOCAL_RANK": "0"}
    outputs = []
    fresh_err = io.BytesIO()
    fresh = await start_worker(program, env, 0, (Sink(None), Sink(fresh_err)))
    fresh.assign(0, None)
    assert await _result(fresh) == 1
    await asyncio.gather(*fresh.pumps)
    drain_all(30)  # the pumps hand lines to a writer thread: wait until it has written them
    outputs.append(fresh_err.getvalue())
    warm_err = io.BytesIO()
    pool = StandbyPool(program, [env], None, lambda _: (Sink(None), Sink(warm_err)), modules=())
    await pool.fill()
    warm = await pool.take(0, env, lambda w: w.assign(0, None))
    assert warm is not None
    assert await _result(warm) == 1
    await asyncio.gather(*warm.pumps)
    await pool.close()
    drain_all(30)
    outputs.append(warm_err.getvalue())
    assert outputs[0] == outputs[1], outputs
    assert b"ValueError: boom" in outputs[0] and b"_standby" not in outputs[0]


async def test_warm_signal_after_imports_and_none_for_a_dead_standby(tmp_path: Path) -> None:
    (tmp_path / "slowmod.py").write_text("import time\ntime.sleep(0.5)\n")
    (tmp_path / "t.py").write_text("")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(tmp_path), "LOCAL_RANK": "0"}
    program = Program("t.py", (), "script", sys.executable, str(tmp_path))
    pool = StandbyPool(program, [env], None, _sinks, modules=("slowmod", "no_such_module"))
    await pool.fill(idle=False)
    assert not await pool.wait_warm(0.05), "not warm before its imports are done"
    assert await pool.wait_warm(60)
    await pool.close()
    pool = StandbyPool(program, [env], None, _sinks, modules=("slowmod",))
    await pool.fill()
    pool._ready[0].signal(9)
    assert not await pool.wait_warm(60)
    await pool.close()
