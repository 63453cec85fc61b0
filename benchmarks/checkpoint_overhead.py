"""Checkpoint overhead of the addon: steps/s with vs without it, stall per checkpoint, restore time.

Trains a >= 50M-parameter MLP with Adam (on CPU, or a GPU with ``--device cuda``) in the same
invocation without and with the addon, alternating (``--pairs`` addon arms, each between two
plain ones; subprocesses; the addon under its default policy), then restores the addon's last
checkpoint and compares with ``torch.load`` of the same state from a local file.

    .venv/bin/python benchmarks/checkpoint_overhead.py [--quick] [--device cuda --steps 3000]

Prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    for i, (x,) in enumerate(loader):
        if i == warmup:
            from lattice.addon import runtime  # imported before the clock starts, in both arms

            before = len(runtime.current().stalls) if runtime.current() else 0
            sync()
            t_start = time.perf_counter()
        loss = model(x.to(device, non_blocking=True)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    sync()
    elapsed = time.perf_counter() - t_start
    out = {
        "params": sum(p.numel() for p in model.parameters()),
        "steps_per_s": (steps - warmup) / elapsed,
    }
    from lattice.addon import runtime

    rt = runtime.current()
    if rt is not None:
        if rt.step_base:
            raise SystemExit(f"the addon arm restored step {rt.step_base}: not a fresh run")
        rt.flush()
        step_s = elapsed / (steps - warmup)
        cost = rt.cost_s or max(rt.stalls) + max(rt.write_s)  # the policy's own estimate
        out.update(
            interval_steps=rt.interval,
            checkpoints_in_window=len(rt.stalls) - before,
            write_s_mean=sum(rt.write_s) / len(rt.write_s),
            policy_overhead_pct=100 * cost / (rt.interval * step_s),
            stall_s_mean=sum(rt.stalls) / len(rt.stalls),
            stall_s_max=max(rt.stalls),
            # the next step waiting for a snapshot's node-local write (the durability gate)
            gate_waits=len(rt.waits),
            gate_wait_s_total=sum(rt.waits),
            **restore_times(rt, model, opt),
        )
    print(json.dumps(out), flush=True)


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


def arm(args: argparse.Namespace, addon: bool, tmp: Path) -> dict[str, float]:
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
    figures = [args.steps, args.warmup, args.width, args.depth, args.batch]
    cmd = [sys.executable, __file__, "--arm", *map(str, figures), "--device", args.device]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"arm failed:\n{done.stderr[-3000:]}")
    sys.stderr.write(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to train on a GPU")
    parser.add_argument("--steps", type=int, default=None, help="steps per arm (default 300)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--every", default=None, help="LATTICE_CHECKPOINT_EVERY (default: auto)")
    parser.add_argument(
        "--pairs", type=int, default=3, help="addon arms, each between two plain ones (default 3)"
    )
    parser.add_argument("--arm", nargs=5, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        train(*args.arm, device=args.device)
        return
    args.width, args.depth = 2048, 12  # 50.3M parameters
    args.steps, args.warmup = (30, 8) if args.quick else (args.steps or 300, 8)
    if args.quick:
        args.pairs = 1
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as d:
        # plain, addon, plain, addon, ..., plain: the machine may be shared, so each addon arm
        # is compared with the better of the plain arms on either side of it, and the median
        # of those ratios is the figure (one arm disturbed by other load does not decide it).
        plains = [arm(args, addon=False, tmp=Path(d))]
        addons = []
        for _ in range(args.pairs):
            addons.append(arm(args, addon=True, tmp=Path(d)))
            plains.append(arm(args, addon=False, tmp=Path(d)))
    ratios = [
        a["steps_per_s"] / max(plains[i]["steps_per_s"], plains[i + 1]["steps_per_s"])
        for i, a in enumerate(addons)
    ]
    middle = sorted(range(len(ratios)), key=lambda i: ratios[i])[len(ratios) // 2]
    with_addon = addons[middle]
    plain = max(plains[middle], plains[middle + 1], key=lambda r: r["steps_per_s"])
    result = {
        "benchmark": "checkpoint_overhead",
        "quick": args.quick,
        "device": args.device,
        "batch": args.batch,
        "every": args.every or "auto",
        "params": plain["params"],
        "steps": args.steps,
        "pairs": args.pairs,
        "throughput_ratios": [round(r, 4) for r in ratios],
        "steps_per_s_without": round(plain["steps_per_s"], 3),
        "steps_per_s_with_addon": round(with_addon["steps_per_s"], 3),
        "overhead_pct": round(100 * (1 - ratios[middle]), 2),
        **{k: round(v, 4) for k, v in with_addon.items() if k not in ("params", "steps_per_s")},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
