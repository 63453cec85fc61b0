"""Section ``local`` of operator_scale: real tiny jobs on a real `lattice up`.

All jobs are applied at once (one multi-document apply) to a control plane with fewer slots
than they ask for; each job's workers run under the agent (`lattice run`, rendezvous, standby
interpreters) and sleep for a few seconds. Polling the plane's API every 0.25 s it measures

* the time from apply to Running for each job (median, p90, max),
* slot utilisation (sum of job sizes / slots) while demand exceeds the slots,
* the wall time until every job has Succeeded.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

TINY = "import os, time; time.sleep(float(os.environ['WORK_S']))\n"


def _jobs(n: int, seed: int, work_s: float) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        low = rng.choice((1, 1, 2))
        docs.append(
            {
                "apiVersion": "exabits.ai/v1",
                "kind": "TrainingJob",
                "metadata": {"name": f"tiny-{i:03d}", "namespace": "bench"},
                "spec": {
                    "minSize": low,
                    "maxSize": low * rng.choice((1, 2)),
                    "priority": rng.choice((0, 0, 0, 1)),
                    "replicaSpecs": {
                        "template": {
                            "spec": {
                                "containers": [
                                    {
                                        "name": "trainingjob",
                                        "image": "bench/tiny",
                                        "command": ["python", "-u", "tiny.py"],
                                        "env": [{"name": "WORK_S", "value": str(work_s)}],
                                    }
                                ]
                            }
                        }
                    },
                },
            }
        )
    return docs


def local_section(args: argparse.Namespace) -> dict[str, Any]:
    """Real jobs through `lattice up`: apply-to-Running, utilisation, time to drain."""
    from lattice.cli.control import Plane
    from lattice.operator.local.child import UpProcess

    home = Path(tempfile.mkdtemp(prefix="lattice-opscale-"))
    image = home / "image"
    image.mkdir()
    (image / "tiny.py").write_text(TINY)
    up = UpProcess(home, slots=args.local_slots, images={"bench/tiny": image}, resize_cooldown_s=2)
    try:
        up.start()
        plane = Plane(home)
        docs = _jobs(args.local_jobs, args.seed, args.local_work_s)
        demand = sum(d["spec"]["minSize"] for d in docs)
        text = yaml.safe_dump_all(docs)
        applied = time.monotonic()
        plane.call("POST", "/v1/apply", content=text.encode())
        running_at: dict[str, float] = {}
        busy: list[float] = []
        done = False
        bound = time.monotonic() + args.local_bound_s
        while time.monotonic() < bound:
            items = plane.call("GET", "/v1/trainingjobs", params={"namespace": "bench"})["items"]
            now = time.monotonic()
            waiting = 0
            used = 0
            for obj in items:
                st = obj.get("status") or {}
                name = obj["metadata"]["name"]
                if st.get("phase") == "Running" and name not in running_at:
                    running_at[name] = now - applied
                if st.get("phase") in (None, "Pending"):
                    waiting += obj["spec"]["minSize"]
                used += int(st.get("size") or 0)
            if waiting and waiting + used > args.local_slots:
                busy.append(min(1.0, used / args.local_slots))
            if all((o.get("status") or {}).get("phase") == "Succeeded" for o in items):
                done = True
                break
            time.sleep(0.25)
        drained = time.monotonic() - applied
        waits = sorted(running_at.values())
        out: dict[str, Any] = {
            "jobs": args.local_jobs,
            "slots": args.local_slots,
            "work_s": args.local_work_s,
            "demand_at_min": demand,
            "all_succeeded": done,
            "apply_to_running_s": {
                "median": round(statistics.median(waits), 2) if waits else None,
                "p90": round(waits[int(0.9 * (len(waits) - 1))], 2) if waits else None,
                "max": round(waits[-1], 2) if waits else None,
                "count": len(waits),
            },
            "utilisation_while_oversubscribed": round(statistics.mean(busy), 3) if busy else None,
            "samples_oversubscribed": len(busy),
            "drain_s": round(drained, 1),
        }
        print(f"[local] {out}", file=sys.stderr)
        return out
    finally:
        up.stop()
