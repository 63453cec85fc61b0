"""Launch zoo scripts as real training processes with the env the agent gives them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lattice.agent.ports import free_port

REPO = Path(__file__).resolve().parents[3]
ZOO = REPO / "examples" / "zoo"
BOOTSTRAP = REPO / "src" / "lattice" / "addon" / "_bootstrap"
DEADLINE_S = 90.0
# torch's own teardown races (gloo dropping a finished collective while the interpreter
# finalizes; a DDP reducer kept past destroy_process_group, pytorch#56297) abort a plain run
# now and then after its work is done; the addon avoids both (patches.yield_to_collectives,
# the reducer released at destroy), a plain run has no such help. It can hang there too
# (`Run.settle`).
TEARDOWN_ABORT = "terminate called without an active exception"


class Run:
    """The processes of one round (all ranks on this host)."""

    def __init__(self, procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
        self.procs = procs
        self.logs = logs

    def wait(self, timeout: float = DEADLINE_S) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for proc in self.procs:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        return codes

    def settle(
        self, out: Path, grace: float = 20.0, timeout: float = DEADLINE_S
    ) -> list[int | None]:
        """Exit codes once every process ended, or ``grace`` seconds after ``out`` was written
        (the run's work done): a process still alive then is stuck in torch's teardown at exit
        (gloo, pytorch#56297) and is killed, its code None."""
        deadline = time.monotonic() + timeout
        written: float | None = None
        while any(proc.poll() is None for proc in self.procs):
            now = time.monotonic()
            if written is None and out.exists():
                written = now
            if now > deadline or (written is not None and now - written > grace):
                break
            time.sleep(0.05)
        codes = [proc.poll() for proc in self.procs]
        self.kill()
        return codes

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            proc.wait(timeout=30)

    def output(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())


class Launcher:
    """Starts rounds; every process started is killed at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.runs: list[Run] = []
        self.rounds = 0

    def start(
        self, script: str, world: int, *, lattice: bool = True, nodes: int = 1, **extra: str
    ) -> Run:
        """``world`` ranks over ``nodes`` nodes, each node with its own local tier."""
        self.rounds += 1
        port = free_port()
        procs, logs = [], []
        for rank in range(world):
            env = {k: v for k, v in os.environ.items() if not k.startswith("LATTICE_")}
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank % (world // nodes)),
                WORLD_SIZE=str(world),
                LOCAL_WORLD_SIZE=str(world // nodes),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(BOOTSTRAP), str(REPO / "src")]),
                ZOO_LOG=str(self.tmp / "ids"),
            )
            if lattice:
                env.update(
                    LATTICE_JOB="zoo",
                    LATTICE_ROUND=str(self.rounds),
                    LATTICE_LOCAL_CKPT_DIR=str(self.local_dir(rank // (world // nodes))),
                    LATTICE_CONTROL_FILE=str(self.tmp / "control"),
                )
            env.update(extra)
            log = self.tmp / f"round{self.rounds}-rank{rank}.log"
            logs.append(log)
            with open(log, "wb") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(ZOO / script)],
                        env=env,
                        cwd=str(self.tmp),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        run = Run(procs, logs)
        self.runs.append(run)
        return run

    def local_dir(self, node: int) -> Path:
        """Node ``node``'s local tier (node 0's is the one of a single-node run)."""
        return self.tmp / "local" if node == 0 else self.tmp / f"local-node{node}"

    def close(self) -> None:
        for run in self.runs:
            run.kill()


def quick_benchmark(name: str, timeout: float, *extra: str) -> dict[str, Any]:
    """Run ``benchmarks/<name>.py --quick``; the JSON object its last line prints."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--quick", *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def poll(cond: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def id_lines(tmp: Path, rank: int = 0) -> list[str]:
    path = tmp / f"ids.{rank}"
    return path.read_text().splitlines() if path.exists() else []


def params(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assemble(replicated: dict[str, Any], pieces: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The full parameters of a sharded checkpoint's ``model.0``: the skeleton in its
    replicated state places every old rank's pieces."""
    from lattice.addon import sharded

    whole = {}
    for name, slot in replicated["model.0"].items():
        tensor = torch.empty(slot["shape"])
        for mine in pieces:
            piece = mine["model.0"][slot[sharded.PIECE]]
            where = tuple(
                slice(o, o + n) for o, n in zip(piece["offset"], piece["local"].shape, strict=True)
            )
            tensor[where] = piece["local"]
        whole[name] = tensor
    return whole
