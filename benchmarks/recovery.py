"""Recovery time: torchrun vs `lattice run`, same DDP script, same machine, same run.

Two agents (one worker each, gloo on loopback) train `examples/ddp_train.py`. After a warm-up
a fault is injected and we measure the seconds from the fault to the first optimizer step
completed by the re-formed group: a STEP line from a process that did not exist before the
fault (a survivor finishing its in-flight step does not count) with the expected world size.

Scenarios:
  worker_kill_elastic  kill -9 one worker, --nnodes 1:3
  worker_kill_fixed    kill -9 one worker, --nnodes 2:2
  node_loss            kill -9 an agent and its workers (--nnodes 1:3; the group shrinks to 1)
  scale_up             a third agent starts (--nnodes 1:3; the group grows to 3); seconds
                       counts from its launch, `pause_s` is the training pause it causes
  rdzv_loss            the rendezvous service is killed -9 and restarted on the same port:
                       recovered = steps keep coming; `restarted` says if a new group formed
  steps_lost           kill -9 one worker, --nnodes 2:2, with checkpoints: torchrun runs the
                       script's own checkpointing (`--checkpoint`, every 10 steps, as torch's
                       docs suggest), Lattice the addon (no script change, automatic interval).
                       `steps_lost` = last step completed before the kill - step resumed from

Both systems use an external rendezvous service so that it can be lost on its own: for torchrun
a TCPStore server process (`--rdzv-backend c10d --rdzv-conf is_host=0`), for Lattice
`lattice rendezvous serve`. Lattice runs with LATTICE_AUTOPATCH=none (plain DDP, as torchrun)
except in `steps_lost`.

    python benchmarks/recovery.py --trials 5            # full run
    python benchmarks/recovery.py --quick               # one trial each, short bound

Prints progress to stderr and one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lattice.agent.env import local_job_dir
from lattice.agent.ports import free_port

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "examples" / "ddp_train.py"
PYTHON = sys.executable
SCENARIOS = (
    "worker_kill_elastic",
    "worker_kill_fixed",
    "node_loss",
    "scale_up",
    "rdzv_loss",
    "steps_lost",
)
RESTORED_RE = re.compile(r"lattice addon: restored step (\d+)")
SAVE_EVERY = 10  # torchrun's arm: the script saves this often
STEP_RE = re.compile(
    r"STEP step=(\d+) rank=(\d+) world=(\d+) round=(\S+) restart=(\S+) pid=(\d+) t=([\d.]+)"
)
STORE_SERVER = (
    "import sys, time, torch.distributed as d\n"
    "s = d.TCPStore('127.0.0.1', int(sys.argv[1]), is_master=True, wait_for_workers=False)\n"
    "print('ready', flush=True)\n"
    "time.sleep(1e9)\n"
)


def log(msg: str) -> None:
    print(f"[recovery {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def descendants(root: int) -> list[int]:
    """All live descendants of ``root`` (from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
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


def kill_tree(pid: int) -> None:
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)


@dataclass(frozen=True)
class Step:
    t: float
    step: int
    rank: int
    world: int
    round: str
    restart: str
    pid: int
    agent: str


@dataclass
class Agent:
    name: str
    proc: subprocess.Popen[bytes]
    out: Path


@dataclass
class Cluster:
    """One system's agents, service and their output for one trial."""

    system: str
    workdir: Path
    nnodes: str
    checkpoint: bool = False  # steps_lost: the script's checkpoints (torchrun) / the addon
    port: int = field(default_factory=free_port)
    # A fresh job id per trial: the addon's node-local tier is keyed by it, and a trial must
    # not restore the state an earlier trial left behind.
    job: str = field(default_factory=lambda: f"bench-{secrets.token_hex(4)}")
    token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    agents: dict[str, Agent] = field(default_factory=dict)
    service: subprocess.Popen[bytes] | None = None
    seen_pids: set[int] = field(default_factory=set)

    # ------------------------------------------------------------ processes

    def start_service(self) -> None:
        if self.system == "torchrun":
            cmd = [PYTHON, "-c", STORE_SERVER, str(self.port)]
        else:
            cmd = [
                PYTHON,
                "-m",
                "lattice",
                "rendezvous",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                f"--token={self.token}",  # a token may start with '-'
            ]
        out = (self.workdir / "service.log").open("ab")
        self.service = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 1),
            ):
                return
            if self.service.poll() is not None:
                raise RuntimeError(f"{self.system} service exited: see {self.workdir}/service.log")
            time.sleep(0.05)
        raise RuntimeError(f"{self.system} service did not start")

    def kill_service(self) -> None:
        if self.service is not None:
            kill_tree(self.service.pid)
            self.service.wait(30)
            self.service = None

    def start_agent(self, name: str) -> None:
        common = [
            "--nnodes",
            self.nnodes,
            "--nproc-per-node",
            "1",
            "--rdzv-endpoint",
            f"127.0.0.1:{self.port}",
            "--rdzv-id",
            self.job,
            "--max-restarts",
            "100",
        ]
        script = [str(SCRIPT), "--steps", "1000000", "--step-time", "0.05"]
        env = {**os.environ, "LATTICE_AUTOPATCH": "none", "OMP_NUM_THREADS": "1"}
        if self.checkpoint and self.system == "torchrun":
            ckpt = str(self.workdir / "ckpt.pt")
            script += ["--checkpoint", ckpt, "--save-every", str(SAVE_EVERY)]
        elif self.checkpoint:
            del env["LATTICE_AUTOPATCH"]  # the default: the addon checkpoints and restores
        if self.system == "torchrun":
            cmd = [
                PYTHON,
                "-m",
                "torch.distributed.run",
                *common,
                "--rdzv-backend",
                "c10d",
                "--rdzv-conf",
                "is_host=0",
                *script,
            ]
        else:
            cmd = [PYTHON, "-m", "lattice", "run", *common, f"--token={self.token}", *script]
            env["LATTICE_NODE_ID"] = name
        out = self.workdir / f"agent-{name}.log"
        proc = subprocess.Popen(
            cmd,
            stdout=out.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=REPO,
            env=env,
        )
        self.agents[name] = Agent(name, proc, out)

    def kill_agent(self, name: str) -> None:
        kill_tree(self.agents[name].proc.pid)

    def teardown(self) -> None:
        for agent in self.agents.values():
            kill_tree(agent.proc.pid)
        for pid in self.seen_pids:  # torchrun leaves orphans behind; nothing may survive a trial
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for agent in self.agents.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.proc.wait(30)
        self.kill_service()
        shutil.rmtree(local_job_dir(self.job), ignore_errors=True)  # memory, in /dev/shm

    # ------------------------------------------------------------ observation

    def steps(self) -> list[Step]:
        out = []
        for agent in self.agents.values():
            for line in agent.out.read_text(errors="replace").splitlines():
                m = STEP_RE.search(line)
                if m:
                    step, rank, world, rnd, restart, pid, t = m.groups()
                    out.append(
                        Step(
                            float(t),
                            int(step),
                            int(rank),
                            int(world),
                            rnd,
                            restart,
                            int(pid),
                            agent.name,
                        )
                    )
        self.seen_pids.update(s.pid for s in out)
        return sorted(out, key=lambda s: s.t)

    def wait_for(self, cond: Callable[[list[Step]], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond(self.steps()):
                return True
            time.sleep(0.1)
        return cond(self.steps())


def warmed_up(world: int, min_steps: int, min_s: float) -> Callable[[list[Step]], bool]:
    """Every rank of one group did ``min_steps`` steps and the group trained ``min_s`` seconds."""

    def cond(steps: list[Step]) -> bool:
        last = [s for s in steps if s.world == world]
        if not last or last[-1].t - last[0].t < min_s:
            return False
        pids = {s.pid for s in last[-4 * world :]}
        per_rank = {r: sum(1 for s in last if s.rank == r and s.pid in pids) for r in range(world)}
        return len(pids) == world and min(per_rank.values()) >= min_steps

    return cond


def run_trial(
    system: str, scenario: str, bound: float, warmup_steps: int, warmup_s: float, keep: Path | None
) -> dict[str, object]:
    nnodes = "2:2" if scenario in ("worker_kill_fixed", "steps_lost") else "1:3"
    with tempfile.TemporaryDirectory(prefix=f"recovery-{system}-") as tmp:
        cluster = Cluster(system, Path(tmp), nnodes, checkpoint=scenario == "steps_lost")
        try:
            cluster.start_service()
            cluster.start_agent("a")
            cluster.start_agent("b")
            if not cluster.wait_for(warmed_up(2, warmup_steps, warmup_s), 180 + warmup_s):
                return {"recovered": False, "seconds": None, "error": "no warm-up"}
            before = {s.pid for s in cluster.steps()}
            victim_pid = max((s for s in cluster.steps() if s.agent == "b"), key=lambda s: s.t).pid
            fault = time.time()
            expected_world = 2
            if scenario.startswith("worker_kill") or scenario == "steps_lost":
                os.kill(victim_pid, signal.SIGKILL)
            elif scenario == "node_loss":
                cluster.kill_agent("b")
                expected_world = 1
            elif scenario == "scale_up":
                cluster.start_agent("c")
                expected_world = 3
            elif scenario == "rdzv_loss":
                cluster.kill_service()
                cluster.start_service()
            if scenario == "rdzv_loss":
                return _rdzv_loss_result(cluster, fault, before, bound)

            def recovered(steps: list[Step]) -> bool:
                return any(
                    s.t > fault and s.pid not in before and s.world == expected_world for s in steps
                )

            ok = cluster.wait_for(recovered, bound)
            if not ok:
                return {"recovered": False, "seconds": None}
            first = min(
                (
                    s
                    for s in cluster.steps()
                    if s.t > fault and s.pid not in before and s.world == expected_world
                ),
                key=lambda s: s.t,
            )
            last_old = max(s.t for s in cluster.steps() if s.pid in before)
            result: dict[str, object] = {
                "recovered": True,
                "seconds": round(first.t - fault, 3),
                "pause_s": round(first.t - last_old, 3),  # no step completed in between
                "restart_count": first.restart,
                "round": first.round,
            }
            if scenario == "steps_lost":
                result.update(_steps_lost(cluster, before, first))
            return result
        finally:
            cluster.teardown()
            if keep is not None:
                dest = keep / f"{scenario}-{system}-{int(time.time() * 1000)}"
                shutil.copytree(tmp, dest)


def _steps_lost(cluster: Cluster, before: set[int], first: Step) -> dict[str, object]:
    """Steps completed before the kill that the re-formed group has to do again."""
    last_step = max(s.step for s in cluster.steps() if s.pid in before)
    if cluster.system == "torchrun":
        resumed = first.step - 1  # the script resumes after the step it saved
    else:  # the script's own counter restarts at 0; the addon says which step it restored
        text = "".join(a.out.read_text(errors="replace") for a in cluster.agents.values())
        found = [int(n) for n in RESTORED_RE.findall(text)]
        if not found:
            return {"steps_lost": None, "last_step": last_step, "resumed_from": 0}
        resumed = max(found)
    return {"steps_lost": last_step - resumed, "last_step": last_step, "resumed_from": resumed}


def _rdzv_loss_result(
    cluster: Cluster, fault: float, before: set[int], bound: float
) -> dict[str, object]:
    """Training must keep going: steps 10 s after the fault, ideally from the same processes."""
    window = min(10.0, bound)
    if not cluster.wait_for(lambda st: any(s.t > fault + window for s in st), bound):
        return {"recovered": False, "seconds": None}
    after = [s for s in cluster.steps() if s.t > fault]
    restarted = any(s.pid not in before for s in after)
    first = min(after, key=lambda s: s.t)
    return {
        "recovered": True,
        "seconds": round(first.t - fault, 3),
        "restarted": restarted,
        "max_gap_s": round(max(b.t - a.t for a, b in itertools.pairwise(after)), 3)
        if len(after) > 1
        else None,
    }


def _median(values: list[object]) -> float | None:
    nums = [float(v) for v in values if isinstance(v, int | float)]
    return round(statistics.median(nums), 3) if nums else None


def summarise(trials: list[dict[str, object]], bound: float) -> dict[str, object]:
    times = [float(t["seconds"]) for t in trials if t.get("recovered")]  # type: ignore[arg-type]
    out: dict[str, object] = {
        "trials": len(trials),
        "never_recovered": sum(1 for t in trials if not t.get("recovered")),
        "median_s": round(statistics.median(times), 3) if times else None,
        "max_s": round(max(times), 3) if times else None,
        "median_pause_s": _median([t.get("pause_s") for t in trials]),
        "median_steps_lost": _median([t.get("steps_lost") for t in trials]),
        "max_steps_lost": max(
            (int(v) for t in trials if isinstance(v := t.get("steps_lost"), int)), default=None
        ),
        "bound_s": bound,
        "runs": trials,
    }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--bound", type=float, default=120.0, help="seconds before 'never recovered'")
    p.add_argument("--quick", action="store_true", help="one trial each, 60 s bound")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--systems", default="torchrun,lattice")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--warmup-s", type=float, default=15.0, help="train this long before a fault")
    p.add_argument("--keep-logs", type=Path, default=None, help="copy each trial's logs here")
    args = p.parse_args()
    if args.quick:
        args.trials, args.bound = 1, min(args.bound, 60.0)
        args.warmup_steps, args.warmup_s = 10, min(args.warmup_s, 10.0)
    scenarios = [s for s in args.scenarios.split(",") if s]
    systems = [s for s in args.systems.split(",") if s]
    for s in scenarios:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}: choose from {', '.join(SCENARIOS)}")
    results: dict[str, dict[str, object]] = {}
    for scenario in scenarios:
        results[scenario] = {}
        for system in systems:
            trials = []
            for i in range(args.trials):
                res = run_trial(
                    system, scenario, args.bound, args.warmup_steps, args.warmup_s, args.keep_logs
                )
                log(f"{scenario} {system} trial {i + 1}/{args.trials}: {res}")
                trials.append(res)
            results[scenario][system] = summarise(trials, args.bound)
    report = {
        "benchmark": "recovery",
        "command": " ".join(["python", "benchmarks/recovery.py", *sys.argv[1:]]),
        "cpus": os.cpu_count(),
        "results": results,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
