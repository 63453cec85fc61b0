"""Chaos soak of the local control plane: one elastic job, N seeded faults, then the books.

    python benchmarks/chaos.py --faults 30 --seed 1          # about 30 s per fault on 2 cores
    python benchmarks/chaos.py --faults 8 --home /tmp/chaos  # keep the home to look at later

It starts `lattice up --slots 3` in a fresh home with `benchmarks/` mapped as the image
`chaos/train`, applies a job (minSize 1, maxSize 3, a checkpoint every step) that runs
`benchmarks/chaos_train.py` (plain DDP, no checkpoint code: the addon restores it), and injects
faults from this menu, one at a time, each after a seeded number of training steps:

  kill9-train         kill -9 one training process
  kill9-agent         kill -9 one worker pod's agent (its training process dies with it)
  kill9-upload        kill -9 rank 0 while it uploads a checkpoint (a shard is in flight)
  sigterm-pod         SIGTERM one worker pod's agent (planned: safe point, no step lost)
  restart-rendezvous  restart the rendezvous service (POST /v1/chaos/restart/rendezvous)
  restart-checkpoint  restart the checkpoint service (POST /v1/chaos/restart/checkpoint)
  slots               `lattice slots` 3 -> 2, or back 2 -> 3 (planned resize)
  rival               apply a competing job (minSize 1, maxSize 1; planned shrink)

After each fault it waits (bounded) until a new group trains and the job is Running again
(service restarts: until training makes progress). Then it asks the job to end after its
current epoch, and checks: the job Succeeded; every committed checkpoint reads back with its
sha256 (and deserialises); the ledger that every rank writes per step, reconciled (a step
redone after a restore counts once, from the group that did it last), consumed every sample
exactly once per epoch, apart from `DistributedSampler`'s padding; how many logged steps each
restart lost; and that no process of the run is left once `lattice up` has stopped.

Progress lines go to stdout; the last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from lattice.agent.env import local_job_dir
from lattice.agent.logline import round_pids
from lattice.operator.local.child import LATTICE, UpFailed, UpProcess

BENCH = Path(__file__).resolve().parent
NAMESPACE = "chaos"
IMAGE = "chaos/train"
KINDS = (
    "kill9-train",
    "kill9-agent",
    "kill9-upload",
    "sigterm-pod",
    "restart-rendezvous",
    "restart-checkpoint",
    "slots",
    "rival",
)
KILL9 = frozenset({"kill9-train", "kill9-agent", "kill9-upload"})
PLANNED = frozenset({"sigterm-pod", "slots", "rival"})
SERVICES = frozenset({"restart-rendezvous", "restart-checkpoint"})
CKPT_ENDPOINT = re.compile(r"--checkpoint-endpoint (\S+)")


class ChaosError(Exception):
    """The soak could not go on (the control plane died, a bound ran out before any fault)."""


@dataclass
class Settings:
    faults: int = 30
    seed: int = 0
    home: Path | None = None
    kinds: tuple[str, ...] | None = None  # an explicit schedule (else seeded, see `schedule`)
    slots: int = 3
    samples: int = 240
    batch: int = 4
    step_sleep: float = 0.1
    ballast_kb: int = 512  # makes each checkpoint ~0.5 MB: an upload takes long enough to hit
    gap_steps: tuple[int, int] = (4, 20)  # steps trained between a recovery and the next fault
    start_bound_s: float = 240.0
    recover_bound_s: float = 150.0
    finish_bound_s: float = 400.0
    worker_grace_s: float = 20.0
    resize_cooldown_s: float = 2.0


def schedule(faults: int, seed: int) -> list[str]:
    """Every kind once (shuffled) first, then seeded random picks."""
    rng = random.Random(seed)
    order = list(KINDS)
    rng.shuffle(order)
    while len(order) < faults:
        order.append(rng.choice(KINDS))
    return order[:faults]


# -- the ledger ---------------------------------------------------------------------------


@dataclass
class Incarnation:
    """One training group (a round's processes): every line it logged shares round and port."""

    key: str
    first_t: float
    first_step: int
    world: int
    pids: dict[int, int] = field(default_factory=dict)
    max_step: int = 0
    last_t: float = 0.0


class Ledger:
    """The per-step lines of every rank, read incrementally from ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._offsets: dict[Path, int] = {}
        self.records: list[dict[str, Any]] = []
        self.incarnations: dict[str, Incarnation] = {}

    def poll(self) -> int:
        added = 0
        if not self.folder.is_dir():
            return 0
        for path in sorted(self.folder.glob("*.jsonl")):
            offset = self._offsets.get(path, 0)
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
            end = data.rfind(b"\n") + 1  # complete lines only
            if not end:
                continue
            self._offsets[path] = offset + end
            for raw in data[:end].splitlines():
                try:
                    rec = json.loads(raw)
                except ValueError:
                    continue
                self._add(rec)
                added += 1
        return added

    def _add(self, rec: dict[str, Any]) -> None:
        rec["inc"] = key = f"{rec['round']}:{rec['port']}"
        self.records.append(rec)
        inc = self.incarnations.get(key)
        if inc is None:
            inc = self.incarnations[key] = Incarnation(key, rec["t"], rec["s"], rec["w"])
        inc.first_t = min(inc.first_t, rec["t"])
        inc.first_step = min(inc.first_step, rec["s"])
        inc.pids[rec["r"]] = rec["pid"]
        inc.max_step = max(inc.max_step, rec["s"])
        inc.last_t = max(inc.last_t, rec["t"])

    def latest(self) -> Incarnation | None:
        return max(self.incarnations.values(), key=lambda i: i.first_t, default=None)

    def steps_after(self, t: float) -> int:
        return len({(r["inc"], r["s"]) for r in self.records if r["t"] > t})

    def first_line_after(self, t: float, *, new_group: bool) -> float | None:
        """Time of the first line after ``t`` (of a group that started after ``t``)."""
        if new_group:
            starts = (i.first_t for i in self.incarnations.values() if i.first_t > t)
            return min(starts, default=None)
        return min((r["t"] for r in self.records if r["t"] > t), default=None)

    def pids(self) -> set[int]:
        return {int(r["pid"]) for r in self.records}


def analyze(
    records: list[dict[str, Any]], faults: list[dict[str, Any]], samples: int
) -> dict[str, Any]:
    """Reconcile the ledger: the final history, the steps each restart lost, exactly-once.

    The final history takes each step from the group that logged it last (a step redone after
    a restore supersedes the earlier try). A group that starts at step R + 1 restored step R;
    the steps logged before it above R were lost and redone. Each group's loss is charged to
    the latest fault injected before its first line (``startup`` before any fault).
    """
    groups: dict[str, dict[str, Any]] = {}
    for r in records:
        g = groups.setdefault(
            r["inc"], {"first_t": r["t"], "first_step": r["s"], "world": r["w"], "lines": []}
        )
        g["first_t"] = min(g["first_t"], r["t"])
        g["first_step"] = min(g["first_step"], r["s"])
        g["lines"].append(r)
    order = sorted(groups, key=lambda k: groups[k]["first_t"])
    rank_of = {k: i for i, k in enumerate(order)}
    winner: dict[int, str] = {}
    for r in records:
        s, k = r["s"], r["inc"]
        if s not in winner or rank_of[k] > rank_of[winner[s]]:
            winner[s] = k
    fault_times = sorted((f["t"], f["index"]) for f in faults)
    lost_by_fault: dict[int, int] = defaultdict(int)
    restarts: list[dict[str, Any]] = []
    max_before = 0
    anomalies: list[str] = []
    for k in order:
        g = groups[k]
        restored = g["first_step"] - 1
        lost = max(0, max_before - restored)
        if restored > max_before:
            anomalies.append(f"group {k} restored step {restored}, never logged before")
        cause = None
        for t, idx in fault_times:
            if t <= g["first_t"]:
                cause = idx
        lost_by_fault[-1 if cause is None else cause] += lost
        restarts.append(
            {"group": k, "restored": restored, "lost": lost, "world": g["world"], "fault": cause}
        )
        max_before = max(max_before, max(r["s"] for r in g["lines"]))
    # The final history, and exactly-once per epoch.
    final: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if winner[r["s"]] == r["inc"]:
            final[r["s"]].append(r)
    incomplete = [s for s, lines in final.items() if len({x["r"] for x in lines}) != lines[0]["w"]]
    gaps = [s for s in range(1, max(final, default=0) + 1) if s not in final]
    by_epoch: dict[int, list[int]] = defaultdict(list)  # steps of each epoch, in order
    for s in sorted(final):
        by_epoch[final[s][0]["e"]].append(s)
    epochs = []
    missing = duplicates = padding = 0
    for e in range(max(by_epoch, default=-1) + 1):
        steps = by_epoch.get(e, [])
        ids: Counter[int] = Counter()
        allowed = 0
        for i, s in enumerate(steps):
            if i == 0 or winner[steps[i - 1]] != winner[s]:
                # A segment starts: the remainder is re-split over its world, padded like
                # DistributedSampler; only the segment that reaches the epoch's end uses the pad.
                remainder = samples - sum(ids.values())
                world = final[s][0]["w"]
                allowed = (-remainder) % world
            for line in final[s]:
                ids.update(line["ids"])
        unique = len(ids)
        extra = sum(ids.values()) - unique
        epoch_missing = samples - unique
        epoch_dups = max(0, extra - allowed)
        missing += epoch_missing
        duplicates += epoch_dups
        padding += min(extra, allowed)
        epochs.append(
            {"epoch": e, "steps": len(steps), "missing": epoch_missing, "duplicates": epoch_dups}
        )
    return {
        "steps": len(final),
        "epochs": epochs,
        "groups": len(groups),
        "restarts": restarts,
        "lost_by_fault": dict(lost_by_fault),
        "missing": missing,
        "duplicates": duplicates,
        "padding_repeats": padding,
        "incomplete_steps": incomplete,
        "step_gaps": gaps,
        "anomalies": anomalies,
    }


# -- the control plane --------------------------------------------------------------------


def job_yaml(name: str, env: dict[str, str], *, min_size: int, max_size: int) -> str:
    env_doc = json.dumps([{"name": k, "value": v} for k, v in env.items()])
    return f"""
apiVersion: exabits.ai/v1
kind: TrainingJob
metadata: {{name: {name}, namespace: {NAMESPACE}}}
spec:
  minSize: {min_size}
  maxSize: {max_size}
  runPolicy: {{backoffLimit: 10000}}
  checkpoint: {{every: "1"}}
  replicaSpecs:
    template:
      spec:
        containers:
          - name: trainingjob
            image: {IMAGE}
            command: ["python", "-u", "chaos_train.py"]
            env: {env_doc}
"""


class Up:
    """One `lattice up` in ``home``; the CLI for what a user would type, the API for polling."""

    def __init__(self, home: Path, settings: Settings) -> None:
        self.home = home
        self.settings = settings
        self.child: UpProcess | None = None
        self._http: httpx.Client | None = None

    def start(self) -> None:
        s = self.settings
        self.child = UpProcess(
            self.home,
            slots=s.slots,
            images={IMAGE: BENCH},
            resize_cooldown_s=s.resize_cooldown_s,
            worker_grace_s=s.worker_grace_s,
        )
        try:
            self.child.start()
        except UpFailed as exc:
            raise ChaosError(str(exc)) from None
        endpoint = (self.home / "endpoint").read_text().strip()
        token = (self.home / "token").read_text().strip()
        self.token = token
        self._http = httpx.Client(
            base_url=f"http://{endpoint}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30.0,
        )

    def alive(self) -> bool:
        return self.child is not None and self.child.alive()

    def stop(self) -> int | None:
        if self._http is not None:
            self._http.close()
            self._http = None
        return self.child.stop() if self.child is not None else None

    def cli(self, *args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            [*LATTICE, *args, "--home", str(self.home)],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise ChaosError(f"lattice {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        assert self._http is not None
        response = self._http.request(method, path, **kwargs)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()

    def status(self, name: str) -> dict[str, Any]:
        obj = self.api("GET", f"/v1/trainingjobs/{NAMESPACE}/{name}")
        return (obj or {}).get("status") or {}

    def job_id(self, name: str) -> str:
        """The job's id (rendezvous, token and checkpoint scope): it carries the store's uid."""
        from lattice.api import parse_job

        return parse_job(self.api("GET", f"/v1/trainingjobs/{NAMESPACE}/{name}")).job_id

    def workers(self, name: str) -> list[dict[str, Any]]:
        found = self.api("GET", f"/v1/trainingjobs/{NAMESPACE}/{name}/describe")
        return (found or {}).get("workers") or []

    def checkpoint_endpoint(self) -> str | None:
        found = CKPT_ENDPOINT.findall((self.home / "up.log").read_text(errors="replace"))
        return found[-1] if found else None

    def tail(self, n: int = 3000) -> str:
        return self.child.tail(n) if self.child is not None else ""


# -- processes ----------------------------------------------------------------------------


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
    return True


def processes_with_env(marker: str) -> set[int]:
    """Live processes whose environment contains ``marker`` (e.g. ``CHAOS_HOME=<home>``)."""
    needle = marker.encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and alive(int(entry.name)):
            found.add(int(entry.name))
    return found


# -- the soak -----------------------------------------------------------------------------


class Chaos:
    def __init__(self, settings: Settings, say: Callable[[str], None] | None = None) -> None:
        self.s = settings
        self._say = say or (lambda msg: print(msg, flush=True))
        self.rng = random.Random(settings.seed)
        self.home = (settings.home or Path(tempfile.mkdtemp(prefix="lattice-chaos-"))).resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        self.name = f"soak-{os.urandom(3).hex()}"
        self.job_id = ""  # TrainingJob.job_id (with the uid the store gives it), once applied
        self.ledger_dir = self.home / "ledger"
        self.stop_file = self.home / "stop"
        self.ledger = Ledger(self.ledger_dir)
        self.up = Up(self.home, settings)
        self.faults: list[dict[str, Any]] = []
        self.rivals: list[str] = []
        self.rival_ids: list[str] = []
        self.slots = settings.slots
        self.pod_pids: set[int] = set()
        self.verified: set[int] = set()
        self.corrupted: list[str] = []
        self.started = time.monotonic()

    def say(self, msg: str) -> None:
        self._say(f"[chaos {time.monotonic() - self.started:7.1f}s] {msg}")

    # -- helpers ------------------------------------------------------------------------

    def env(self, ledger: Path | None, **extra: str) -> dict[str, str]:
        env = {
            "CHAOS_HOME": str(self.home),
            "CHAOS_SAMPLES": str(self.s.samples),
            "CHAOS_BATCH": str(self.s.batch),
            "CHAOS_STEP_SLEEP": str(self.s.step_sleep),
            "CHAOS_BALLAST_KB": str(self.s.ballast_kb),
        }
        if ledger is not None:
            env["CHAOS_LEDGER_DIR"] = str(ledger)
        env.update(extra)
        return env

    def poll(self) -> dict[str, Any]:
        """Read new ledger lines and the job's status; raise if the control plane died."""
        if not self.up.alive():
            raise ChaosError(f"lattice up exited\n{self.up.tail()}")
        self.ledger.poll()
        for w in self.up.workers(self.name):
            self.pod_pids.add(int(w["pid"]))
        return self.up.status(self.name)

    def wait(self, ready: Callable[[], Any], bound_s: float, tick: float = 0.25) -> Any:
        deadline = time.monotonic() + bound_s
        while True:
            value = ready()
            if value or time.monotonic() > deadline:
                return value
            time.sleep(tick)

    def verify_checkpoints(self, via_service: bool = False) -> int:
        """Read every committed checkpoint of the job and check its sha256 (and that it loads).

        From the storage directory by default (independent of the service), or through the
        checkpoint service with `CheckpointClient`. A checkpoint removed by retention between
        listing and reading is not counted."""
        from lattice.addon.state import loads
        from lattice.checkpoint.errors import CheckpointRejected, CorruptCheckpoint
        from lattice.checkpoint.storage import Storage

        checked = 0
        if via_service:
            from lattice.checkpoint.client import CheckpointClient

            endpoint = self.up.checkpoint_endpoint()
            if endpoint is None:
                return 0
            client = CheckpointClient(endpoint, self.job_id, self.up.token, retry_for=20)
            manifests = client.list()

            def read(m: Any, name: str) -> bytes:
                return client.get_shard(m.step, name)

            def gone(m: Any) -> bool:
                return all(x.step != m.step for x in client.list())
        else:
            storage = Storage(str(self.home / "checkpoints"))
            manifests = storage.manifests(self.job_id)

            def read(m: Any, name: str) -> bytes:
                return b"".join(storage.read_shard(m, name))

            def gone(m: Any) -> bool:
                return storage.manifest(self.job_id, m.step) is None

        for m in manifests:
            try:
                shards = {name: read(m, name) for name in m.shards}
                state = loads(shards["state"])
                if int(state["step"]) != m.step:
                    raise CorruptCheckpoint(f"state says step {state['step']}")
                loads(shards["rng"])
            except (CorruptCheckpoint, CheckpointRejected, KeyError, RuntimeError) as exc:
                if gone(m):
                    continue
                self.corrupted.append(f"step {m.step}: {exc}")
                self.say(f"CORRUPT checkpoint step {m.step}: {exc}")
                continue
            self.verified.add(m.step)
            checked += 1
        if via_service:
            client.close()
        return checked

    # -- faults -------------------------------------------------------------------------

    def _training_pid(self, rank: int | None) -> tuple[int, int] | None:
        inc = self.ledger.latest()
        if inc is None:
            return None
        live = {r: p for r, p in inc.pids.items() if alive(p)}
        if rank is not None:
            live = {r: p for r, p in live.items() if r == rank}
        if not live:
            return None
        r = self.rng.choice(sorted(live))
        return r, live[r]

    def _pod(self) -> dict[str, Any] | None:
        running = [w for w in self.up.workers(self.name) if w["phase"] == "Running"]
        if not running or not all(alive(int(w["pid"])) for w in running):
            return None
        return self.rng.choice(sorted(running, key=lambda w: w["index"]))

    def inject(self, index: int, kind: str) -> dict[str, Any]:
        fault: dict[str, Any] = {"index": index, "kind": kind, "detail": ""}
        if kind in ("kill9-train", "kill9-upload"):
            only = 0 if kind == "kill9-upload" else None  # rank 0 is the one that uploads
            target = self.wait(lambda: (self.poll(), self._training_pid(only))[1], 60)
            if target is None:
                raise ChaosError("no live training process to kill")
            rank, pid = target
            if kind == "kill9-upload":
                fault["in_flight"] = self._await_upload(pid)
            fault["t"] = time.time()
            os.kill(pid, signal.SIGKILL)
            fault["detail"] = f"rank {rank} pid {pid}"
            if kind == "kill9-upload":
                fault["detail"] += f", shard in flight: {fault['in_flight']}"
        elif kind in ("kill9-agent", "sigterm-pod"):
            pod = self.wait(lambda: (self.poll(), self._pod())[1], 60)
            if pod is None:
                raise ChaosError("no running worker pod")
            fault["t"] = time.time()
            os.kill(int(pod["pid"]), signal.SIGKILL if kind == "kill9-agent" else signal.SIGTERM)
            fault["detail"] = f"{pod['name']} pid {pod['pid']}"
        elif kind in SERVICES:
            service = kind.split("-", 1)[1]
            fault["t"] = time.time()
            t0 = time.monotonic()
            self.up.api("POST", f"/v1/chaos/restart/{service}")
            fault["detail"] = f"{service} service down and up in {time.monotonic() - t0:.2f}s"
        elif kind == "slots":
            self.slots = self.s.slots - 1 if self.slots == self.s.slots else self.s.slots
            shrink = self.slots < self.s.slots  # growing back always forms a larger group
            fault["fits"] = shrink and self._group_fits(self.slots)
            fault["t"] = time.time()
            self.up.cli("slots", str(self.slots))
            fault["detail"] = f"slots -> {self.slots}"
        elif kind == "rival":
            name = f"rival-{self.name.split('-', 1)[1]}-{index}"  # unique: see self.name
            doc = job_yaml(
                name,
                self.env(None, CHAOS_SAMPLES="48", CHAOS_EPOCHS="2", CHAOS_STEP_SLEEP="0.05"),
                min_size=1,
                max_size=1,
            )
            fault["fits"] = self._group_fits(self.slots - 1)
            fault["t"] = time.time()
            self.up.cli("apply", "-f", "-", stdin=doc)
            self.rivals.append(name)
            self.rival_ids.append(self.up.job_id(name))
            fault["detail"] = f"applied {name} (minSize 1)"
        else:
            raise ValueError(f"unknown fault kind {kind!r}")
        return fault

    def _await_upload(self, pid: int, bound_s: float = 20.0) -> bool:
        """Wait until a checkpoint shard is being uploaded (its temporary file exists)."""
        tmp = self.home / "checkpoints" / self.job_id / ".tmp"

        def uploads() -> set[str]:
            with contextlib.suppress(OSError):
                return {entry.name for entry in os.scandir(tmp)}
            return set()

        stale = uploads()  # left by an earlier torn upload, if any
        deadline = time.monotonic() + bound_s
        while time.monotonic() < deadline and alive(pid):
            if uploads() - stale:
                return True
            time.sleep(0.002)
        return False

    def _group_fits(self, free: int) -> bool:
        """Whether the group training now fits in ``free`` slots (then it may simply go on).

        A grow that is still starting when slots shrink, or a rival that takes a free slot,
        changes nothing for the running group: no new group forms, and none is needed.
        """
        self.ledger.poll()
        latest = self.ledger.latest()
        return latest is not None and latest.world <= free

    def recover(self, fault: dict[str, Any]) -> bool:
        """Wait until the job trains and is Running again after the fault.

        A fault that ends the group (a kill, a SIGTERM, a shrink) needs a group formed after
        it; a service restart or a planned change the group fits in needs only a next step.
        """
        new_group = fault["kind"] not in SERVICES and not fault.get("fits")
        t = fault["t"]

        def ready() -> float | None:
            phase = self.poll().get("phase")
            if phase == "Failed":
                raise ChaosError(f"the job failed after fault {fault['index']}")
            first = self.ledger.first_line_after(t, new_group=new_group)
            return first if first is not None and phase == "Running" else None

        first = self.wait(ready, self.s.recover_bound_s)
        if first is None:
            fault["recovery_s"] = None
            return False
        fault["recovery_s"] = round(first - t, 3)
        return True

    def gap(self) -> None:
        """Train a seeded number of steps (and let an earlier rival finish) before a fault."""
        steps = self.rng.randint(*self.s.gap_steps)
        since = time.time()

        def ready() -> bool:
            self.poll()
            rivals_done = all(
                self.up.status(r).get("phase") in ("Succeeded", "Failed") for r in self.rivals
            )
            return rivals_done and self.ledger.steps_after(since) >= steps

        self.wait(ready, self.s.recover_bound_s)

    # -- the run ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        kinds = list(self.s.kinds) if self.s.kinds else schedule(self.s.faults, self.s.seed)
        self.say(f"home {self.home}, job {self.name}, seed {self.s.seed}: {' '.join(kinds)}")
        phase = "?"
        up_code: int | None = None
        try:
            self.up.start()
            doc = job_yaml(
                self.name,
                self.env(self.ledger_dir, CHAOS_STOP_FILE=str(self.stop_file)),
                min_size=1,
                max_size=self.s.slots,
            )
            self.up.cli("apply", "-f", "-", stdin=doc)
            self.job_id = self.up.job_id(self.name)
            ok = self.wait(
                lambda: self.poll().get("phase") == "Running" and self.ledger.records,
                self.s.start_bound_s,
            )
            if not ok:
                raise ChaosError(f"the job did not start training\n{self.up.tail()}")
            self.say(f"training with {self.up.status(self.name).get('size')} workers")
            for index, kind in enumerate(kinds):
                self.gap()
                fault = self.inject(index, kind)
                self.faults.append(fault)
                fault["survived"] = self.recover(fault)
                status = self.up.status(self.name)
                self.say(
                    f"fault {index + 1}/{len(kinds)} {kind} ({fault['detail']}): "
                    + (
                        f"recovered in {fault['recovery_s']:.1f}s"
                        if fault["survived"]
                        else "NOT recovered in time"
                    )
                    + f", {status.get('phase')} at size {status.get('size')}"
                    + f", step {self.ledger.latest().max_step if self.ledger.latest() else 0}"
                )
                self.verify_checkpoints()
            self.say("faults done: asking the job to end after this epoch")
            self.stop_file.touch()
            phase = self.wait(
                lambda: (p := self.poll().get("phase")) in ("Succeeded", "Failed") and p,
                self.s.finish_bound_s,
                0.5,
            ) or str(self.up.status(self.name).get("phase"))
            self.say(f"job {phase}")
            self.wait(
                lambda: all(
                    self.up.status(r).get("phase") in ("Succeeded", "Failed") for r in self.rivals
                ),
                self.s.finish_bound_s,
                0.5,
            )
            self.ledger.poll()
            self.verify_checkpoints()
            self.verify_checkpoints(via_service=True)
            rival_phases = {r: self.up.status(r).get("phase") for r in self.rivals}
        except ChaosError as exc:
            self.say(f"ERROR: {exc}")
            phase = f"error: {str(exc).splitlines()[0]}"
            rival_phases = {}
        finally:
            pod_logs = "\n".join(
                p.read_text(errors="replace") for p in (self.home / "logs").rglob("*.log")
            )
            up_code = self.up.stop()
        self.ledger.poll()
        for _round, pids in round_pids(pod_logs):
            self.pod_pids.update(pids)
        suspects = self.ledger.pids() | self.pod_pids
        marker = f"CHAOS_HOME={self.home}"
        leftovers = self.wait(
            lambda: not ({p for p in suspects if alive(p)} | processes_with_env(marker)),
            30,
            0.5,
        )
        left = sorted({p for p in suspects if alive(p)} | processes_with_env(marker))
        if leftovers is False and left:
            self.say(f"processes left behind: {left}")
        shm = local_job_dir(self.job_id)
        shm_left = shm.is_dir() and any(p.is_file() for p in shm.rglob("*"))  # files, not dirs
        for job_id in [self.job_id, *self.rival_ids]:
            if job_id:
                shutil.rmtree(local_job_dir(job_id), ignore_errors=True)
        return self.summary(phase, up_code, left, rival_phases, shm_left)

    def summary(
        self,
        phase: str,
        up_code: int | None,
        left: list[int],
        rival_phases: dict[str, Any],
        shm_left: bool,
    ) -> dict[str, Any]:
        book = analyze(self.ledger.records, self.faults, self.s.samples)
        lost = book["lost_by_fault"]
        by_kind: dict[str, dict[str, Any]] = {}
        for f in self.faults:
            f["steps_lost"] = lost.get(f["index"], 0)
            k = by_kind.setdefault(
                f["kind"], {"injected": 0, "survived": 0, "steps_lost": [], "recovery_s": []}
            )
            k["injected"] += 1
            k["survived"] += int(bool(f.get("survived")))
            k["steps_lost"].append(f["steps_lost"])
            if f.get("recovery_s") is not None:
                k["recovery_s"].append(f["recovery_s"])
        kill9 = [f["steps_lost"] for f in self.faults if f["kind"] in KILL9]
        recoveries = [f["recovery_s"] for f in self.faults if f.get("recovery_s") is not None]
        uploads = [f.get("in_flight") for f in self.faults if f["kind"] == "kill9-upload"]
        return {
            "job_phase": phase,
            "lattice_up_exit": up_code,
            "faults_injected": len(self.faults),
            "faults_survived": sum(1 for f in self.faults if f.get("survived")),
            "by_kind": by_kind,
            "steps": book["steps"],
            "epochs": len(book["epochs"]),
            "groups": book["groups"],
            "steps_lost_total": sum(lost.values()),
            "steps_lost_startup": lost.get(-1, 0),
            "steps_lost_per_kill9": {
                "max": max(kill9, default=0),
                "mean": round(statistics.mean(kill9), 3) if kill9 else 0,
            },
            "steps_lost_planned": sum(f["steps_lost"] for f in self.faults if f["kind"] in PLANNED),
            "steps_lost_service_restarts": sum(
                f["steps_lost"] for f in self.faults if f["kind"] in SERVICES
            ),
            "uploads_hit_in_flight": sum(1 for u in uploads if u),
            "checkpoints_verified": len(self.verified),
            "corrupted_checkpoints": len(self.corrupted),
            "recovery_s": {
                "mean": round(statistics.mean(recoveries), 2) if recoveries else None,
                "max": round(max(recoveries), 2) if recoveries else None,
            },
            "leftover_processes": len(left),
            "node_local_tier_left": shm_left,
            "duplicates": book["duplicates"],
            "missing": book["missing"],
            "padding_repeats": book["padding_repeats"],
            "incomplete_steps": len(book["incomplete_steps"]),
            "step_gaps": len(book["step_gaps"]),
            "ledger_anomalies": book["anomalies"],
            "rivals": rival_phases,
            "faults": [
                {
                    k: f.get(k)
                    for k in ("kind", "detail", "fits", "survived", "recovery_s", "steps_lost")
                }
                for f in self.faults
            ],
            "seconds": round(time.monotonic() - self.started, 1),
            "seed": self.s.seed,
            "home": str(self.home),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--home", type=Path, default=None, help="fresh directory (default: temp)")
    parser.add_argument("--kinds", default=None, help="comma-separated schedule (overrides)")
    parser.add_argument("--step-sleep", type=float, default=Settings.step_sleep)
    args = parser.parse_args()
    if args.home is not None and args.home.exists() and any(args.home.iterdir()):
        parser.error(f"--home {args.home} is not empty: use a fresh directory")
    kinds = tuple(args.kinds.split(",")) if args.kinds else None
    if kinds and not set(kinds) <= set(KINDS):
        parser.error(f"--kinds: choose from {', '.join(KINDS)}")
    settings = Settings(
        faults=len(kinds) if kinds else args.faults,
        seed=args.seed,
        home=args.home,
        kinds=kinds,
        step_sleep=args.step_sleep,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop `lattice up` on the way out
    for key in list(os.environ):  # the control plane must not inherit a caller's job settings
        if key.startswith(("LATTICE_", "TORCHELASTIC_")):
            del os.environ[key]
    result = Chaos(settings).run()
    print(json.dumps(result), flush=True)
    ok = result["job_phase"] == "Succeeded" and not result["corrupted_checkpoints"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
