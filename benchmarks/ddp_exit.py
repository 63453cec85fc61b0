"""DDP teardown hang at exit (pytorch#56297): how often a plain DDP script hangs, with and without
the addon.

The script is the common shape: ``main()`` trains a DDP model, calls
``destroy_process_group()`` and returns, so DDP is freed afterwards. Each run is 2 ranks on
gloo; a run counts as hung when it has not exited ``--bound`` seconds after starting.

    .venv/bin/python benchmarks/ddp_exit.py --runs 20

The hang is a race that needs a loaded machine; run it beside other work. Prints one JSON object
as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lattice.agent.ports import PortReservation

REPO = Path(__file__).resolve().parents[1]
BOOTSTRAP = REPO / "src" / "lattice" / "addon" / "_bootstrap"

SCRIPT = """
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def main():
    dist.init_process_group("gloo")
    model = DistributedDataParallel(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(20):
        loss = model(torch.randn(8, 64)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    dist.destroy_process_group()


main()
"""


def one_run(script: Path, tmp: Path, addon: bool, bound: float) -> bool:
    """True when both ranks exited within ``bound`` seconds."""
    with PortReservation() as reserved:  # free now; the ranks' store binds it next
        port = reserved.port
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith("LATTICE_")}
        env.update(
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(BOOTSTRAP), str(REPO / "src")]),
            LATTICE_JOB="ddp-exit",
            LATTICE_LOCAL_CKPT_DIR=str(tmp / "local"),
            LATTICE_AUTOPATCH="torch" if addon else "none",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script)],
                env=env,
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    deadline = time.monotonic() + bound
    ok = True
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            ok = False
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="runs per arm")
    parser.add_argument("--bound", type=float, default=60.0, help="seconds before 'hung'")
    args = parser.parse_args()
    result: dict[str, object] = {"benchmark": "ddp_exit", "runs": args.runs, "bound_s": args.bound}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        script = tmp / "train.py"
        script.write_text(SCRIPT)
        for addon in (False, True):
            hung = 0
            for i in range(args.runs):
                if not one_run(script, tmp, addon, args.bound):
                    hung += 1
                print(
                    f"[{'addon' if addon else 'plain'}] run {i + 1}: {hung} hung", file=sys.stderr
                )
            result["hung_with_addon" if addon else "hung_without_addon"] = hung
    print(json.dumps(result))


if __name__ == "__main__":
    main()
