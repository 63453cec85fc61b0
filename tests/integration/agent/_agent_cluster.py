"""Real clusters for the agent's integration tests: a `lattice rendezvous serve` process and
`lattice run` agents training examples/ddp_train.py with gloo on loopback.

Every process runs in its own session and is killed with all its descendants at teardown.
Agents write stdout and stderr to one log file each; the training script's ``STEP`` lines
(prefixed ``[rankN]: `` by the agent) are what the tests assert on.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lattice.agent.ports import free_port

REPO = Path(__file__).resolve().parents[3]
TRAIN = REPO / "examples" / "ddp_train.py"
LATTICE = [sys.executable, "-m", "lattice"]
STEP_RE = re.compile(
    r"^\[rank(\d+)\]: STEP step=(\d+) rank=(\d+) world=(\d+) round=(\d+) restart=(\d+) "
    r"pid=(\d+) t=([\d.]+)"
)


@dataclass(frozen=True)
class Step:
    prefix_rank: int
    step: int
    rank: int
    world: int
    round: int
    restart: int
    pid: int
    t: float
    node: str


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def kill_tree(pid: int) -> None:
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    if not cond():
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def base_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LATTICE_", "TORCHELASTIC_", "PET_"))
        and k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    }
    env.update(LATTICE_AUTOPATCH="none", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


class Service:
    """`lattice rendezvous serve` on a fixed loopback port (so it can be restarted there)."""

    def __init__(self, workdir: Path, token: str) -> None:
        self.port = free_port()
        self.token = token
        self.log = workdir / "service.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [*LATTICE, "rendezvous", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*cmd, f"--token={self.token}"],  # a token may start with '-'
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=base_env(),
        )

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"service exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return True
            return False

        wait_until(up, 60, "the rendezvous service to listen")

    def kill(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc.pid)
            self.proc.wait(30)
            self.proc = None


class AgentProc:
    """One `lattice run` process and its log."""

    def __init__(self, node: str, cmd: list[str], log: Path, env: dict[str, str]) -> None:
        self.node = node
        self.log = log
        self.proc = subprocess.Popen(
            cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True, env=env
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def steps(self) -> list[Step]:
        out = []
        for line in self.text().splitlines():
            m = STEP_RE.match(line)
            if m:
                a, b, c, d, e, f, g, t = m.groups()
                out.append(
                    Step(
                        int(a), int(b), int(c), int(d), int(e), int(f), int(g), float(t), self.node
                    )
                )
        return out

    def kill_tree(self) -> None:
        kill_tree(self.proc.pid)


class Cluster:
    """A service plus any number of agents of one job."""

    def __init__(self, workdir: Path, nnodes: str = "1:3") -> None:
        self.workdir = workdir
        self.token = secrets.token_urlsafe(16)
        self.service = Service(workdir, self.token)
        self.nnodes = nnodes
        self.agents: dict[str, AgentProc] = {}

    def add_agent(self, node: str, *extra: str, steps: int = 1_000_000) -> AgentProc:
        cmd = [
            *LATTICE,
            "run",
            "--nnodes",
            self.nnodes,
            "--nproc-per-node",
            "1",
            "--rdzv-endpoint",
            self.service.endpoint,
            "--rdzv-id",
            "itest",
            f"--token={self.token}",
            "--node-id",
            node,
            *extra,
            str(TRAIN),
            "--steps",
            str(steps),
            "--step-time",
            "0.05",
        ]
        agent = AgentProc(node, cmd, self.workdir / f"agent-{node}.log", base_env())
        self.agents[node] = agent
        return agent

    def steps(self) -> list[Step]:
        return sorted((s for a in self.agents.values() for s in a.steps()), key=lambda s: s.t)

    def training(self, world: int, after: float = 0.0, min_steps: int = 3) -> list[Step]:
        """Steps of one round at ``world`` size, after time ``after``, if every rank did some."""
        steps = [s for s in self.steps() if s.world == world and s.t > after]
        if not steps:
            return []
        last_round = steps[-1].round
        mine = [s for s in steps if s.round == last_round]
        ranks = {r: sum(1 for s in mine if s.rank == r) for r in range(world)}
        return mine if min(ranks.values()) >= min_steps else []

    def wait_training(self, world: int, after: float = 0.0, timeout: float = 120.0) -> list[Step]:
        wait_until(
            lambda: bool(self.training(world, after)), timeout, f"training at world size {world}"
        )
        return self.training(world, after)

    def dump(self) -> str:
        """The tail of every log, for assertion messages."""
        parts = []
        for agent in self.agents.values():
            lines = [ln for ln in agent.text().splitlines() if "STEP" not in ln]
            parts.append(f"--- {agent.node}\n" + "\n".join(lines[-25:]))
        parts.append("--- service\n" + "\n".join(self.service.log.read_text().splitlines()[-15:]))
        return "\n".join(parts)

    def teardown(self) -> None:
        for agent in self.agents.values():
            agent.kill_tree()
        for agent in self.agents.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.proc.wait(30)
        self.service.kill()
