"""The main job, end to end on the local control plane: grow, survive a kill, shrink, succeed.

    python examples/demo.py            # about 3-5 minutes on 2 CPU cores
    python examples/demo.py --quick    # smaller data (what the test suite runs)

It starts `lattice up` with one slot in a fresh home directory, applies the documents'
`examples/example-job.yaml` (minSize 1, maxSize 3; its image `exabits/lattice-resnet` maps to
`examples/resnet`) and then, printing `lattice get trainingjobs` at each stage:

1. raises the capacity to 3 slots: the job grows from 1 to 3 workers;
2. kills one training process with SIGKILL: the group re-forms and the addon restores the
   last checkpoint (no code in `main.py` does that);
3. applies a second job (minSize 2): the first shrinks to 1 worker to admit it;
4. waits until both jobs have Succeeded.

The last line is one JSON object with what was measured. Exit status 0 only if every stage
happened as described.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lattice.agent.logline import round_pids
from lattice.operator.local.child import LATTICE, UpFailed, UpProcess

ROOT = Path(__file__).resolve().parent.parent
RESTORED = re.compile(r"lattice addon: restored step (\d+)")


class Failed(Exception):
    """A stage did not happen within its bound."""


class Demo:
    def __init__(self, home: Path, quick: bool) -> None:
        self.home = home
        self.quick = quick
        self.started = time.monotonic()
        self.figures: dict[str, Any] = {}
        self.up: UpProcess | None = None

    # -- the control plane and the CLI -------------------------------------------------

    def lattice(self, *args: str, stdin: str | None = None, show: bool = True) -> str:
        cmd = [*LATTICE, *args, "--home", str(self.home)]
        if show:
            print(f"\n$ lattice {' '.join(args)}", flush=True)
        done = subprocess.run(
            cmd, input=stdin, capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            raise Failed(f"lattice {' '.join(args)} failed: {done.stderr.strip()}")
        if show:
            print(done.stdout.rstrip(), flush=True)
        return done.stdout

    def start(self) -> None:
        self.up = UpProcess(self.home, slots=1, resize_cooldown_s=2)
        try:
            self.up.start()
        except UpFailed as exc:
            raise Failed(str(exc)) from None
        print(f"lattice up: control plane running, home {self.home}", flush=True)

    def stop(self) -> None:
        if self.up is not None:
            self.up.stop()

    def job(self, name: str) -> dict[str, Any]:
        out = self.lattice("get", "trainingjob", name, "-n", "lattice", "-o", "json", show=False)
        return json.loads(out)

    def status(self, name: str) -> dict[str, Any]:
        return self.job(name).get("status") or {}

    def wait(self, what: str, ready: Callable[[], Any], bound_s: float) -> Any:
        """Poll ``ready`` until it returns something truthy; fail after ``bound_s``."""
        deadline = time.monotonic() + bound_s
        while time.monotonic() < deadline:
            if self.up is not None and not self.up.alive():
                raise Failed(f"lattice up exited waiting for {what}:\n{self.up.tail()}")
            value = ready()
            if value:
                return value
            time.sleep(0.5)
        raise Failed(f"timed out after {bound_s:.0f} s waiting for {what}")

    def running_at(self, name: str, size: int) -> Callable[[], bool]:
        def check() -> bool:
            s = self.status(name)
            return s.get("phase") == "Running" and s.get("size") == size

        return check

    def log_text(self, name: str) -> str:
        return "".join(p.read_text(errors="replace") for p in self._logs(name))

    def _logs(self, name: str) -> list[Path]:
        return sorted((self.home / "logs" / "lattice").glob(f"{name}-worker-*.log"))

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 1)

    # -- the stages ----------------------------------------------------------------------

    def run(self) -> None:
        self.start()
        doc = yaml.safe_load((ROOT / "examples" / "example-job.yaml").read_text())
        env = (
            {"EPOCHS": "3", "SAMPLES": "768", "STEP_SLEEP": "0.05"}
            if self.quick
            else {"EPOCHS": "4", "SAMPLES": "3072", "STEP_SLEEP": "0.05"}
        )
        container = doc["spec"]["replicaSpecs"]["template"]["spec"]["containers"][0]
        container["env"] = [{"name": k, "value": v} for k, v in env.items()]
        self.lattice("apply", "-f", "-", stdin=yaml.safe_dump(doc))
        self.wait("example-job Running with 1 worker", self.running_at("example-job", 1), 180)
        self.lattice("get", "trainingjobs", "-n", "lattice")

        print("\n== 1. capacity 1 -> 3 slots: the job grows", flush=True)
        t = time.monotonic()
        self.lattice("slots", "3")
        self.wait("example-job to grow to 3", self.running_at("example-job", 3), 180)
        self.figures["grow_s"] = round(time.monotonic() - t, 1)
        self.lattice("get", "trainingjobs", "-n", "lattice")

        print("\n== 2. kill -9 one training process: the group re-forms and restores", flush=True)
        restarts = int(self.status("example-job").get("restarts", 0))
        pid = self.wait("a training process of example-job", self._victim, 120)
        restored_before = len(RESTORED.findall(self.log_text("example-job")))
        t = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        print(f"killed training process {pid} with SIGKILL", flush=True)

        def recovered() -> bool:
            s = self.status("example-job")
            again = s.get("phase") == "Running" and int(s.get("restarts", 0)) > restarts
            restored = len(RESTORED.findall(self.log_text("example-job"))) > restored_before
            return again and restored

        self.wait("example-job to recover", recovered, 180)
        self.figures["recovery_s"] = round(time.monotonic() - t, 1)
        steps = [int(s) for s in RESTORED.findall(self.log_text("example-job"))]
        self.figures["restored_step"] = steps[-1]
        print(f"the addon restored step {steps[-1]} (see `lattice logs example-job`)", flush=True)
        self.lattice("get", "trainingjobs", "-n", "lattice")

        print("\n== 3. a second job (minSize 2) arrives: the first shrinks to admit it", flush=True)
        second = copy.deepcopy(doc)  # the same example, under another name, with minSize 2
        second["metadata"]["name"] = "second-job"
        second["spec"].update(minSize=2, maxSize=2)
        second["spec"]["replicaSpecs"]["template"]["spec"]["containers"][0]["env"] = [
            {"name": k, "value": v} for k, v in {**env, "EPOCHS": "2"}.items()
        ]
        t = time.monotonic()
        self.lattice("apply", "-f", "-", stdin=yaml.safe_dump(second))

        def shared() -> bool:
            a, b = self.status("example-job"), self.status("second-job")
            return a.get("size") == 1 and b.get("phase") == "Running" and b.get("size") == 2

        self.wait("example-job at 1 and second-job at 2", shared, 240)
        self.figures["shrink_s"] = round(time.monotonic() - t, 1)
        self.lattice("get", "trainingjobs", "-n", "lattice")

        print("\n== 4. both jobs run to completion", flush=True)

        def finished() -> bool:
            phases = {n: self.status(n).get("phase") for n in ("example-job", "second-job")}
            if "Failed" in phases.values():
                raise Failed(f"a job failed: {phases}")
            return set(phases.values()) == {"Succeeded"}

        self.wait("both jobs to succeed", finished, 900 if not self.quick else 600)
        self.lattice("get", "trainingjobs", "-n", "lattice")
        self.lattice("describe", "trainingjob", "example-job", "-n", "lattice")
        final = self.status("example-job")
        self.figures["restarts"] = final.get("restarts", 0)
        self.figures["total_s"] = self.elapsed()

    def _victim(self) -> int | None:
        """The pid of a live training process of example-job's worker 1 (from its agent log),
        once the group of 3 has been training for a while."""
        rank0 = self.home / "logs" / "lattice" / "example-job-worker-0.log"
        path = self.home / "logs" / "lattice" / "example-job-worker-1.log"
        if not path.exists() or not rank0.exists():
            return None
        if not re.search(r"epoch=\d+ step=\d+ .* world=3", rank0.read_text(errors="replace")):
            return None
        found = round_pids(path.read_text(errors="replace"))
        if not found:
            return None
        pid = found[-1][1][0]
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller data (for tests)")
    parser.add_argument("--home", type=Path, default=None, help="state dir (default: a new one)")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="lattice-demo-"))
    home.mkdir(parents=True, exist_ok=True)
    demo = Demo(home.resolve(), args.quick)
    ok, error = False, None
    try:
        demo.run()
        ok = True
    except (Failed, subprocess.TimeoutExpired) as exc:
        error = str(exc)
        print(f"\ndemo FAILED: {error}\nlogs: {home}/up.log and {home}/logs/", flush=True)
    finally:
        demo.stop()
    print(json.dumps({"ok": ok, "error": error, "home": str(home), **demo.figures}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
