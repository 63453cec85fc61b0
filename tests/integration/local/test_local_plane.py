"""The local control plane end to end: a real `lattice up`, the real CLI, real worker processes.

Each test starts its own `lattice up` in a fresh home and drives it only through the `lattice`
commands a user types. Waits are bounded polls of `lattice get -o json`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lattice.agent.env import local_job_dir
from lattice.agent.logline import round_pids
from lattice.api import parse_job
from lattice.operator.local.child import LATTICE, UpFailed, UpProcess

REPO = Path(__file__).resolve().parents[3]


def job_yaml(
    name: str,
    *,
    command: list[str],
    min_size: int = 1,
    max_size: int = 2,
    env: dict[str, str] | None = None,
    working_dir: str | None = None,
    inject: bool = True,
    extra_spec: str = "",
) -> str:
    env_lines = "".join(
        f"\n              - {{name: {k}, value: {json.dumps(v)}}}" for k, v in (env or {}).items()
    )
    return f"""
apiVersion: exabits.ai/v1
kind: TrainingJob
metadata: {{name: {name}, namespace: default}}
spec:
  minSize: {min_size}
  maxSize: {max_size}
  injectLattice: {"true" if inject else "false"}{extra_spec}
  replicaSpecs:
    template:
      spec:
        containers:
          - name: trainingjob
            image: test/examples
            command: {json.dumps(command)}{
        f"{chr(10)}            workingDir: {working_dir}" if working_dir else ""
    }{f"{chr(10)}            env:{env_lines}" if env_lines else ""}
"""


class Plane:
    """One `lattice up` in ``home`` and the CLI pointed at it."""

    def __init__(self, home: Path, slots: int) -> None:
        self.home = home
        self.slots = slots
        self.child: UpProcess | None = None

    def start(self) -> None:
        self.child = UpProcess(
            self.home,
            slots=self.slots,
            images={"test/examples": REPO / "examples"},
            resize_cooldown_s=1,
            worker_grace_s=10,
        )
        try:
            self.child.start()
        except UpFailed as exc:
            pytest.fail(str(exc))

    def stop(self) -> int:
        assert self.child is not None
        code = self.child.stop()
        assert code is not None
        return code

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*LATTICE, *args, "--home", str(self.home)],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def ok(self, *args: str, stdin: str | None = None) -> str:
        done = self.cli(*args, stdin=stdin)
        assert done.returncode == 0, f"lattice {args}: {done.stderr}\n{self.dump()}"
        return done.stdout

    def get(self, name: str) -> dict[str, Any]:
        return json.loads(self.ok("get", "trainingjob", name, "-o", "json"))

    def status(self, name: str) -> dict[str, Any]:
        return self.get(name).get("status") or {}

    def wait(self, ready: Callable[[], Any], bound_s: float, what: str) -> Any:
        deadline = time.monotonic() + bound_s
        while time.monotonic() < deadline:
            if self.child is not None and not self.child.alive():
                pytest.fail(f"lattice up exited while waiting for {what}\n{self.dump()}")
            value = ready()
            if value:
                return value
            time.sleep(0.3)
        pytest.fail(f"timed out after {bound_s} s waiting for {what}\n{self.dump()}")

    def phase(self, name: str, phase: str, bound_s: float = 180) -> dict[str, Any]:
        return self.wait(
            lambda: (s := self.status(name)).get("phase") == phase and s, bound_s, f"{name} {phase}"
        )

    def worker_log(self, pod: str, ns: str = "default") -> str:
        path = self.home / "logs" / ns / f"{pod}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def dump(self) -> str:
        parts = [(self.home / "up.log").read_text(errors="replace")[-4000:]]
        for path in sorted((self.home / "logs").rglob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


@pytest.fixture
def plane(tmp_path: Path, clean_env: dict[str, str]) -> Iterator[Plane]:
    p = Plane(tmp_path / "home", slots=2)
    p.home.mkdir()
    p.start()
    try:
        yield p
    finally:
        p.stop()


def test_commands_without_a_control_plane_say_how_to_start_one(tmp_path: Path) -> None:
    done = subprocess.run(
        [*LATTICE, "get", "trainingjobs", "--home", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "no local control plane" in done.stderr and "lattice up" in done.stderr
    assert "Traceback" not in done.stderr


def test_job_runs_to_success_and_every_command_shows_it(plane: Plane) -> None:
    steps = ["python", "-u", "ddp_train.py", "--steps", "30", "--step-time", "0.02"]
    out = plane.ok("apply", "-f", "-", stdin=job_yaml("tiny", command=steps))
    assert out.strip() == "trainingjob.exabits.ai/tiny created"
    # Re-applying the same document changes nothing.
    assert "unchanged" in plane.ok("apply", "-f", "-", stdin=job_yaml("tiny", command=steps))
    running = plane.phase("tiny", "Running")
    assert 1 <= running["size"] <= 2
    # What an agent killed with -9 leaves behind: its node-local checkpoints.
    leftover = local_job_dir(parse_job(plane.get("tiny")).job_id) / "node-killed" / "step-3"
    leftover.mkdir(parents=True)
    final = plane.phase("tiny", "Succeeded")
    plane.wait(lambda: not leftover.parent.parent.exists(), 30, "node-local tier released")
    # A pod that was still terminating at the release leaves files after it: `lattice up`
    # drops a finished job's tier when it stops (the soak stopped it right after Succeeded).
    late = local_job_dir(parse_job(plane.get("tiny")).job_id) / "node-late" / "step-4"
    late.mkdir(parents=True)
    assert plane.stop() == 0
    assert not late.parent.parent.exists(), "a finished job's tier is dropped at shutdown"
    plane.start()
    obj = plane.get("tiny")
    assert obj["kind"] == "TrainingJob" and obj["apiVersion"] == "exabits.ai/v1"
    assert final["phase"] == "Succeeded"
    table = plane.ok("get", "trainingjobs")
    assert re.search(r"^tiny\s+Succeeded\s+\d\s+1\s+2\s+0\s+\d+[smh]$", table, re.M), table
    described = plane.ok("describe", "trainingjob", "tiny")
    assert "Phase:        Succeeded" in described
    assert re.search(r"Normal\s+Succeeded", described), described
    logs = plane.ok("logs", "tiny")
    assert "STEP step=30" in logs and "DONE" in logs
    assert plane.ok("get", "tj", "-o", "name").strip() == "trainingjob/tiny"
    job_id = parse_job(obj).job_id
    assert job_id.startswith("default.tiny.")  # the store's uid names this instance
    assert f"Job ID:       {job_id}" in described
    assert plane.ok("delete", "trainingjob", "tiny").strip() == 'trainingjob "tiny" deleted'
    plane.wait(lambda: "No resources" in plane.cli("get", "tj").stderr, 60, "tiny to be removed")
    assert not local_job_dir(job_id).exists(), "node-local checkpoints go too"


def test_invalid_document_is_refused_naming_the_field_and_stores_nothing(plane: Plane) -> None:
    bad = job_yaml("bad", command=["python", "x.py"], min_size=3, max_size=2)
    done = plane.cli("apply", "-f", "-", stdin=bad)
    assert done.returncode == 2
    assert done.stderr.startswith("lattice: error:") and "minSize" in done.stderr
    assert "Traceback" not in done.stderr
    assert "No resources found" in plane.cli("get", "trainingjobs").stderr
    missing = plane.cli("get", "trainingjob", "nope")
    assert missing.returncode == 2 and 'trainingjob "nope" not found' in missing.stderr


def test_env_and_working_dir_are_honoured_without_the_agent(plane: Plane) -> None:
    probe = "import os; print('PROBE', os.environ['GREETING'], os.getcwd(), flush=True)"
    doc = job_yaml(
        "plain",
        command=["python", "-c", probe],
        min_size=1,
        max_size=1,
        env={"GREETING": "hello there"},
        working_dir="resnet",
        inject=False,
    )
    plane.ok("apply", "-f", "-", stdin=doc)
    plane.phase("plain", "Succeeded", 120)
    line = next(ln for ln in plane.ok("logs", "plain").splitlines() if "PROBE" in ln)
    assert line.endswith(f"PROBE hello there {REPO / 'examples' / 'resnet'}")


def test_a_script_that_fails_the_same_way_again_fails_the_job_with_its_error(
    plane: Plane,
) -> None:
    crash = ["python", "-c", "import sys; sys.exit('dataset is missing: /data/train')"]
    spec = "\n  runPolicy: {backoffLimit: 2}"
    plane.ok("apply", "-f", "-", stdin=job_yaml("crash", command=crash, extra_spec=spec))
    failed = plane.phase("crash", "Failed", 240)
    assert failed["restarts"] > 2, failed  # the failed rounds count, as backoffLimit does
    described = plane.ok("describe", "trainingjob", "crash")
    assert "Failed" in described
    # The script's own words reach the status, not only an exit code.
    assert "dataset is missing: /data/train" in failed.get("workerError", ""), failed


def test_killed_training_process_recovers_and_the_job_succeeds(plane: Plane) -> None:
    steps = ["python", "-u", "ddp_train.py", "--steps", "400", "--step-time", "0.05"]
    plane.ok("apply", "-f", "-", stdin=job_yaml("sturdy", command=steps, min_size=2))
    plane.wait(
        lambda: (s := plane.status("sturdy")).get("phase") == "Running" and s.get("size") == 2,
        180,
        "sturdy Running at 2",
    )

    def victim() -> int | None:
        found = round_pids(plane.worker_log("sturdy-worker-1"))
        if not found:
            return None
        pid = found[-1][1][0]
        return pid if _alive(pid) and "STEP" in plane.worker_log("sturdy-worker-1") else None

    pid = plane.wait(victim, 120, "a training process of sturdy")
    before = plane.status("sturdy")
    os.kill(pid, signal.SIGKILL)
    again = plane.wait(
        lambda: (
            (s := plane.status("sturdy")).get("phase") == "Running"
            and s.get("restarts", 0) > before.get("restarts", 0)
            and s
        ),
        120,
        "sturdy to re-form after the kill",
    )
    assert again["size"] == 2
    plane.phase("sturdy", "Succeeded", 300)
    described = plane.ok("describe", "trainingjob", "sturdy")
    workers = re.findall(r"pid (\d+)", described)
    assert not any(_alive(int(p)) for p in workers), "no worker process is left behind"
    assert not _alive(pid)


def test_state_survives_a_restart_of_the_control_plane(plane: Plane) -> None:
    steps = ["python", "-u", "ddp_train.py", "--steps", "20", "--step-time", "0.02"]
    plane.slots = 0  # hold the job Pending across the restart: nothing runs meanwhile
    plane.ok("slots", "0")
    plane.ok("apply", "-f", "-", stdin=job_yaml("durable", command=steps))
    assert plane.status("durable").get("phase", "Pending") == "Pending"
    assert plane.stop() == 0
    plane.slots = 1
    plane.start()
    plane.phase("durable", "Succeeded", 180)
