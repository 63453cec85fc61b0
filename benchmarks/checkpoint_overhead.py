"""Checkpoint overhead of the addon: steps/s with vs without it, stall per checkpoint, restore time.

Trains a >= 50M-parameter MLP with Adam (on CPU, or a GPU with ``--device cuda``) in the same
invocation without and with the addon (subprocesses; the addon under its default policy), then
restores the addon's last checkpoint and compares with ``torch.load`` of the same state from a
local file.

A shared machine's speed drifts by 5-12 % over the minute an arm takes, more than the 3 %
budget, so each addon arm also measures its checkpoints' cost inside its own run: the steps a
snapshot and its write touched, against the quiet steps just before them (`accounted`); the
same arithmetic on the plain arms is the control. The arms run one after another (plain,
addon, plain, ...). ``--control`` gives the addon arms the addon's environment with the addon
switched off: the ratio the method reads where the addon does no work.

``--side-by-side`` runs each pair at the same time instead, each arm on a core of its own
(one thread each, the addon's writes on its arm's core, swapping cores from pair to pair):
the machine's drift then slows both arms alike, and the ratio is of the steps each made in
the window where both were timing.

    .venv/bin/python benchmarks/checkpoint_overhead.py [--quick] [--pairs 3] [--steps 2000]
        [--control] [--service] [--side-by-side] [--device cuda --steps 3000]

Prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BOOTSTRAP = REPO / "src" / "lattice" / "addon" / "_bootstrap"


def train(steps: int, warmup: int, width: int, depth: int, batch: int, device: str) -> None:
    """One arm (runs in a subprocess): prints a JSON line with its figures."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    data = TensorDataset(torch.randn(steps * batch, width))
    loader = DataLoader(data, batch_size=batch)
    t_start = 0.0
    rt = None
    # Per timed step: when its body began, the snapshots taken so far (a snapshot is taken at
    # the batch fetch before a body) and whether a write was in flight as it began.
    began: list[float] = []
    taken: list[int] = []
    beside: list[bool] = []
    for i, (x,) in enumerate(loader):
        if i == warmup:
            from lattice.addon import runtime  # imported before the clock starts, in both arms

            rt = runtime.current()
            sync()
            _meet_the_other_arm()
            t_start = time.perf_counter()
        if i >= warmup:
            began.append(time.perf_counter())
            taken.append(len(rt.stalls) if rt else 0)
            beside.append(_in_flight(rt))
        loss = model(x.to(device, non_blocking=True)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    sync()
    end = time.perf_counter()
    elapsed = end - t_start
    began.append(end)
    out = {
        "params": sum(p.numel() for p in model.parameters()),
        "steps_per_s": (steps - warmup) / elapsed,
        "step_s": [b - a for a, b in itertools.pairwise(began)],
        "began": began,  # CLOCK_MONOTONIC: comparable between arms running side by side
    }
    if rt is not None:
        if rt.step_base:
            raise SystemExit(f"the addon arm restored step {rt.step_base}: not a fresh run")
        rt.flush()
        step_s = elapsed / (steps - warmup)
        cost = rt.cost_s or max(rt.stalls) + max(rt.write_s)  # the policy's own estimate
        out.update(
            interval_steps=rt.interval,
            checkpoints_in_window=taken[-1] - taken[0],
            # step d's time holds the stall of a snapshot taken before body d + 1
            snapshot_after=[d for d in range(len(taken) - 1) if taken[d + 1] > taken[d]],
            beside_write=beside,
            write_s_mean=sum(rt.write_s) / len(rt.write_s),
            uploads=len(rt.upload_s),
            # CPU seconds, or whole seconds with the service on this machine (as here)
            upload_s_mean=sum(rt.upload_s) / len(rt.upload_s) if rt.upload_s else 0.0,
            policy_overhead_pct=100 * cost / (rt.interval * step_s),
            stall_s_mean=sum(rt.stalls) / len(rt.stalls),
            stall_s_max=max(rt.stalls),
            # the next step waiting for a snapshot's node-local write (the durability gate)
            gate_waits=len(rt.waits),
            gate_wait_s_total=sum(rt.waits),
            **restore_times(rt, model, opt),
        )
    print(json.dumps(out), flush=True)


def _meet_the_other_arm() -> None:
    """Side by side: start timing when the other arm does (its warm-up may be slower)."""
    barrier = os.environ.get("BENCH_BARRIER")
    if not barrier:
        return
    Path(barrier, os.environ["BENCH_ARM"]).touch()
    deadline = time.monotonic() + 600
    while len(list(Path(barrier).iterdir())) < 2:
        if time.monotonic() > deadline:
            raise SystemExit("the other arm never reached its timed steps")
        time.sleep(0.01)


def _in_flight(rt: Any) -> bool:
    """Whether a snapshot is being written, or (with a service) uploaded."""
    if rt is None:
        return False
    return bool(rt.writing) or rt._uploading or rt._upload_next is not None


QUIET_BASE = 30  # quiet steps before a snapshot whose median is its baseline
AFTER = 2  # steps after the write that are still charged to it (caches refilled)


def spans(snapshot_after: list[int], beside: list[bool]) -> list[tuple[int, int]]:
    """The steps each snapshot in the window is charged for, ``[first, end)``: the step that
    holds its stall, the steps that began while its write was in flight, and `AFTER` more
    (never into the next snapshot's steps)."""
    out = []
    n = len(beside)
    for k, first in enumerate(snapshot_after):
        end = first + 1
        while end < n and beside[end]:
            end += 1
        limit = snapshot_after[k + 1] if k + 1 < len(snapshot_after) else n
        out.append((first, min(end + AFTER, limit, n)))
    return out


def costs(step_s: list[float], charged: list[tuple[int, int]], quiet: list[bool]) -> list[float]:
    """Training time each span lost against the median of the `QUIET_BASE` quiet steps just
    before it: measured inside one run, so the drift between arms (the noise that hides a
    3 % effect on a shared VM) does not enter. Spans with fewer than 10 quiet steps before
    them are left out."""
    out = []
    for first, end in charged:
        before = [step_s[j] for j in range(first - 1, -1, -1) if quiet[j]][:QUIET_BASE]
        if len(before) < 10:
            continue
        base = statistics.median(before)
        out.append(sum(step_s[j] - base for j in range(first, end)))
    return out


def accounted(addon: dict[str, Any], plain: list[dict[str, Any]]) -> dict[str, Any]:
    """One addon arm's checkpoint costs, measured in its run, as a share of step time at its
    interval; and the same arithmetic on the plain arms beside it, over the same steps (the
    control: what the method reads where nothing was written)."""
    charged = spans(addon["snapshot_after"], addon["beside_write"])
    taken = set(addon["snapshot_after"])
    quiet = [not b and d not in taken for d, b in enumerate(addon["beside_write"])]
    mine = costs(addon["step_s"], charged, quiet)
    control = [c for p in plain for c in costs(p["step_s"], charged, [True] * len(p["step_s"]))]
    step = statistics.median(t for t, q in zip(addon["step_s"], quiet, strict=True) if q)
    per = addon["interval_steps"] * step
    return {
        "checkpoint_costs_s": mine,
        "accounted_pct": round(100 * statistics.mean(mine) / per, 2) if mine else None,
        "control_pct": round(100 * statistics.mean(control) / per, 2) if control else None,
    }


def accounted_nothing() -> dict[str, Any]:
    """`accounted` for an arm without the addon (``--control``)."""
    return {"checkpoint_costs_s": [], "accounted_pct": None, "control_pct": None}


def restore_times(rt: object, model: object, opt: object) -> dict[str, float]:
    """Addon restore (read + verify + load_state_dict) vs torch.load of the same state."""
    import torch

    from lattice.addon import local_tier

    step = local_tier.steps(rt.root)[0]  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    got = rt._valid(step)  # type: ignore[attr-defined]
    model.load_state_dict(got["state"]["model.0"])  # type: ignore[attr-defined]
    opt.load_state_dict(got["state"]["optimizer.0"])  # type: ignore[attr-defined]
    addon_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.pt"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        raw = torch.load(path, weights_only=True)
        model.load_state_dict(raw["model"])  # type: ignore[attr-defined]
        opt.load_state_dict(raw["opt"])  # type: ignore[attr-defined]
        plain_s = time.perf_counter() - t0
    return {"restore_s_addon": addon_s, "restore_s_torch_load": plain_s}


class Service:
    """A checkpoint service (a real ``lattice checkpoint serve``) for the addon arms."""

    def __init__(self, data: Path) -> None:
        from lattice.agent.ports import free_port

        self.port = free_port()
        self.admin = "bench-admin-token"
        self.arms = 0
        cmd = [sys.executable, "-m", "lattice", "checkpoint", "serve"]
        cmd += ["--port", str(self.port), "--data", str(data), "--token", self.admin]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        from _serve import wait_ready  # beside this file (not importable by the unit tests)

        wait_ready(f"http://127.0.0.1:{self.port}/healthz", self.proc, "lattice checkpoint serve")

    def env(self) -> dict[str, str]:
        """A job of its own for each arm: an arm restores nothing from an earlier one."""
        from lattice.common.auth import job_token

        self.arms += 1
        job = f"bench-{self.arms}"
        return {
            "LATTICE_JOB": job,
            "LATTICE_CHECKPOINT_ENDPOINT": f"127.0.0.1:{self.port}",
            "LATTICE_TOKEN": job_token(self.admin, job),
        }

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def arm_command(
    args: argparse.Namespace, addon: bool, tmp: Path, service: Service | None = None
) -> tuple[list[str], dict[str, str]]:
    """The command and environment of one arm (a subprocess running `train`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATTICE_")}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    local = tmp / "local"
    shutil.rmtree(local, ignore_errors=True)  # each addon arm starts afresh, restoring nothing
    if addon:
        env.update(
            LATTICE_JOB="bench",
            LATTICE_LOCAL_CKPT_DIR=str(local),
            **({"LATTICE_CHECKPOINT_EVERY": args.every} if args.every else {}),
            PYTHONPATH=os.pathsep.join([str(BOOTSTRAP), str(REPO / "src")]),
        )
        env.update(service.env() if service else {})
        if args.control:
            env["LATTICE_AUTOPATCH"] = "none"  # the bootstrap does nothing: a plain run
    figures = [args.steps, args.warmup, args.width, args.depth, args.batch]
    cmd = [sys.executable, __file__, "--arm", *map(str, figures), "--device", args.device]
    return cmd, env


def arm(
    args: argparse.Namespace, addon: bool, tmp: Path, service: Service | None = None
) -> dict[str, Any]:
    cmd, env = arm_command(args, addon, tmp, service)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    return _figures(done.returncode, done.stdout, done.stderr)


def _figures(code: int, stdout: str, stderr: str) -> dict[str, Any]:
    if code != 0:
        raise SystemExit(f"arm failed:\n{stderr[-3000:]}")
    sys.stderr.write(stderr)
    return json.loads(stdout.strip().splitlines()[-1])


def side_by_side(
    args: argparse.Namespace, tmp: Path, service: Service | None, swap: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A plain and an addon arm at the same time, each pinned to a core of its own with one
    thread: (plain, addon)."""
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        raise SystemExit("--side-by-side needs two cores")
    if swap:
        cores.reverse()
    procs = []
    barrier = tmp / "barrier"
    shutil.rmtree(barrier, ignore_errors=True)
    barrier.mkdir(parents=True)
    for addon, core in ((False, cores[0]), (True, cores[1])):
        name = "addon" if addon else "plain"
        cmd, env = arm_command(args, addon, tmp / name, service)
        env.update(OMP_NUM_THREADS="1", BENCH_BARRIER=str(barrier), BENCH_ARM=name)
        procs.append(
            subprocess.Popen(
                cmd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                preexec_fn=lambda core=core: os.sched_setaffinity(0, {core}),
            )
        )
    outs = [p.communicate() for p in procs]
    plain, addon = (_figures(p.returncode, *o) for p, o in zip(procs, outs, strict=True))
    return plain, addon


def common_window_ratio(plain: dict[str, Any], addon: dict[str, Any]) -> float:
    """Steps per second of the addon arm over the plain arm's, both counted in the window
    where both were timing steps (the arm that ends first would otherwise have the machine
    to itself for the rest)."""
    t0 = max(plain["began"][0], addon["began"][0])
    t1 = min(plain["began"][-1], addon["began"][-1])
    if t1 <= t0:
        raise SystemExit("the arms' timed steps did not overlap")

    def rate(began: list[float]) -> float:
        inside = [t for t in began if t0 <= t <= t1]
        return (len(inside) - 1) / (inside[-1] - inside[0])

    return rate(addon["began"]) / rate(plain["began"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to train on a GPU")
    parser.add_argument("--steps", type=int, default=None, help="steps per arm (default 600)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--every", default=None, help="LATTICE_CHECKPOINT_EVERY (default: auto)")
    parser.add_argument(
        "--pairs", type=int, default=3, help="addon arms, each between two plain ones (default 3)"
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="the addon arms get the addon's environment with LATTICE_AUTOPATCH=none (the "
        "bootstrap does nothing): the ratio the method reads where the addon does no work",
    )
    parser.add_argument(
        "--side-by-side",
        action="store_true",
        help="run each pair's arms at the same time, each on a core of its own with one "
        "thread (the machine's drift slows both alike)",
    )
    parser.add_argument("--raw", help="write every arm's figures (JSON) to this file")
    parser.add_argument(
        "--service",
        action="store_true",
        help="addon arms upload to a checkpoint service on this machine (as `lattice up` and "
        "the operator give every job); its own CPU is then on the same cores",
    )
    parser.add_argument("--arm", nargs=5, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        train(*args.arm, device=args.device)
        return
    args.width, args.depth = 2048, 12  # 50.3M parameters
    args.steps, args.warmup = (30, 8) if args.quick else (args.steps or 600, 8)
    if args.quick:
        args.pairs = 1
    with contextlib.ExitStack() as stack:
        from lattice.common import node_local  # where the agent would put the tier

        shm = str(node_local.SHM) if node_local.shm_usable() else None
        d = stack.enter_context(tempfile.TemporaryDirectory(dir=shm))
        service = None
        if args.service:
            service = Service(Path(stack.enter_context(tempfile.TemporaryDirectory())))  # disk
            stack.callback(service.close)
        if args.side_by_side:
            pairs = [
                side_by_side(args, Path(d), service, swap=i % 2 == 1) for i in range(args.pairs)
            ]
            plains = [p for p, _ in pairs]
            addons = [a for _, a in pairs]
            ratios = [common_window_ratio(p, a) for p, a in pairs]
            beside = [a["steps_per_s"] / r for a, r in zip(addons, ratios, strict=True)]
            around = [[p] for p in plains]
        else:
            # plain, addon, plain, ..., plain: each addon arm against the mean of the plain
            # arms on either side of it (a drift that is linear over the three cancels).
            plains = [arm(args, addon=False, tmp=Path(d))]
            addons = []
            for _ in range(args.pairs):
                addons.append(arm(args, addon=True, tmp=Path(d), service=service))
                plains.append(arm(args, addon=False, tmp=Path(d)))
            beside = [
                (plains[i]["steps_per_s"] + plains[i + 1]["steps_per_s"]) / 2
                for i in range(len(addons))
            ]
            around = [plains[i : i + 2] for i in range(len(addons))]
            ratios = [a["steps_per_s"] / beside[i] for i, a in enumerate(addons)]
    if args.raw:
        Path(args.raw).write_text(json.dumps({"plains": plains, "addons": addons}))
    middle = sorted(range(len(ratios)), key=lambda i: ratios[i])[len(ratios) // 2]
    with_addon = addons[middle]
    books = [
        accounted(a, around[i]) if "snapshot_after" in a else accounted_nothing()
        for i, a in enumerate(addons)
    ]
    result = {
        "benchmark": "checkpoint_overhead",
        "quick": args.quick,
        "device": args.device,
        "batch": args.batch,
        "every": args.every or "auto",
        "service": args.service,
        "params": with_addon["params"],
        "steps": args.steps,
        "pairs": args.pairs,
        "control": args.control,
        "side_by_side": args.side_by_side,
        "throughput_ratios": [round(r, 4) for r in ratios],
        "steps_per_s_without": round(beside[middle], 3),
        "steps_per_s_with_addon": round(with_addon["steps_per_s"], 3),
        "overhead_pct": round(100 * (1 - ratios[middle]), 2),
        # Measured inside each addon run (see `accounted`), one figure per arm, and the same
        # arithmetic on the plain arms (the control, ~0 when the method reads no phantom cost).
        "checkpoint_costs_s": [round(c, 3) for b in books for c in b["checkpoint_costs_s"]],
        "accounted_overhead_pcts": [b["accounted_pct"] for b in books],
        "accounted_control_pcts": [b["control_pct"] for b in books],
        **{
            k: round(v, 4)
            for k, v in with_addon.items()
            if k not in ("params", "steps_per_s") and not isinstance(v, list)
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
