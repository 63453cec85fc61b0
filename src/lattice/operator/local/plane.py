"""The local control plane's loop: the Kubernetes adapter's cycle, with processes for pods.

Every cycle (every ``tick_s``, or at once when a pod exits or a job is applied): read the jobs
from the store, allocate the slots across them (`allocate`), reconcile each (`reconcile`), and
apply the actions: start and stop worker processes, tell the rendezvous service each job's
target size, write status and events. Nothing but the store survives a restart: pods that died
with `lattice up` are simply started again by the next cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from lattice.agent.env import local_job_dir
from lattice.api import TrainingJob, parse_job
from lattice.common.auth import job_token
from lattice.common.errors import UserError
from lattice.common.http import BackgroundService
from lattice.operator.core import (
    Action,
    CreateWorker,
    DeleteJob,
    DeleteWorker,
    EmitEvent,
    JobDemand,
    Observed,
    ReconcileConfig,
    Services,
    SetRendezvousTarget,
    UpdateStatus,
    WorkerState,
    allocate,
    demand_for,
    reconcile,
)
from lattice.operator.core.reconcile import ACTIVE
from lattice.operator.kubernetes.rendezvous import RendezvousView
from lattice.operator.local.pods import Pods
from lattice.operator.local.store import Obj, Store

log = logging.getLogger("lattice.local")

EXAMPLE_IMAGES = ("exabits/lattice-resnet", "breezeml/lattice-resnet")
INHERITED_PREFIXES = ("LATTICE_", "TORCHELASTIC_")
INHERITED_DROP = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def default_home() -> Path:
    return Path(os.environ.get("LATTICE_HOME") or Path.home() / ".lattice")


def example_dir() -> Path:
    """`examples/resnet` of this checkout (the docs' example images map there)."""
    repo = Path(__file__).resolve().parents[4]
    for base in (repo, Path.cwd()):
        candidate = base / "examples" / "resnet"
        if candidate.is_dir():
            return candidate
    return repo / "examples" / "resnet"


def read_or_create_token(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return token


@dataclass
class PlaneConfig:
    home: Path
    slots: int
    images: dict[str, Path] = field(default_factory=dict)
    resize_cooldown_s: float = 10.0
    worker_grace_s: float = 30.0
    tick_s: float = 0.5
    reconcile: ReconcileConfig = field(default_factory=ReconcileConfig)


class ControlPlane:
    """Store, services, pods and the loop of one `lattice up`."""

    def __init__(self, config: PlaneConfig) -> None:
        if config.slots < 1:
            raise UserError("--slots must be at least 1")
        self.config = config
        config.home.mkdir(parents=True, exist_ok=True)
        self.token = read_or_create_token(config.home / "token")
        self.store = Store(config.home / "state.db")
        self.slots = config.slots
        self.images = {**dict.fromkeys(EXAMPLE_IMAGES, example_dir()), **config.images}
        self._wake = asyncio.Event()
        self.pods = Pods(config.home / "logs", self.wake)
        self._services: list[BackgroundService] = []
        self._service_by_name: dict[str, BackgroundService] = {}
        self._factories: dict[str, Callable[[], web.Application]] = {}
        self.rendezvous: RendezvousView | None = None
        self.services: Services | None = None
        self.cycles = 0
        self._tier_released: set[str] = set()  # job ids whose node-local checkpoints are gone

    # -- lifecycle -----------------------------------------------------------------------

    def start_services(self) -> None:
        from lattice.checkpoint.server import create_app as checkpoint_app
        from lattice.rendezvous.server import create_app as rendezvous_app

        token = self.token
        ckpt_dir = str(self.config.home / "checkpoints")
        self._factories = {
            "rendezvous": lambda: rendezvous_app(token, settle_s=1.0, lease_s=3.0),
            "checkpoint": lambda: checkpoint_app(token, ckpt_dir, keep=3),
        }
        for name, factory in self._factories.items():
            svc = BackgroundService(factory)
            svc.start()
            self._services.append(svc)
            self._service_by_name[name] = svc
        rdzv, ckpt = self._service_by_name["rendezvous"], self._service_by_name["checkpoint"]
        self.rendezvous = RendezvousView(rdzv.endpoint, token)
        self.services = Services(
            rendezvous_endpoint=rdzv.endpoint,
            checkpoint_endpoint=ckpt.endpoint,
            launcher=(sys.executable, "-m", "lattice"),
        )

    def wake(self) -> None:
        self._wake.set()

    async def restart_service(self, name: str) -> str:
        """Stop an in-process service and start it again on the same port (chaos testing):
        the rendezvous service loses its soft state, the checkpoint service keeps its files."""
        old = self._service_by_name.get(name)
        if old is None:
            raise UserError(f"no service {name!r}: use rendezvous or checkpoint")
        await asyncio.to_thread(old.stop)
        new = BackgroundService(self._factories[name], old.host, old.port)
        await asyncio.to_thread(new.start)
        self._services[self._services.index(old)] = new
        self._service_by_name[name] = new
        log.info("%s service restarted on %s", name, new.endpoint)
        return new.endpoint

    async def run(self) -> None:
        """Reconcile until cancelled."""
        while True:
            self._wake.clear()
            try:
                await self.cycle()
            except Exception:  # a bug in one cycle must not stop the control plane
                log.exception("reconcile cycle failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.tick_s):
                    await self._wake.wait()

    async def shutdown(self) -> None:
        await self.pods.stop_all(self.config.worker_grace_s)
        # A job that finished in the last cycles may still have had a pod terminating then
        # (that pod's files outlive the release): its tier goes here, with every pod stopped.
        # Unfinished jobs keep theirs (the next `lattice up` resumes them from it).
        for raw, _deleting in self.store.jobs():
            with contextlib.suppress(UserError):
                job = parse_job(raw)
                if job.current_status().terminal:
                    shutil.rmtree(local_job_dir(job.job_id), ignore_errors=True)
        if self.rendezvous is not None:
            await self.rendezvous.close()
        for svc in self._services:
            svc.stop()
        self.store.close()

    # -- one cycle -----------------------------------------------------------------------

    async def cycle(self) -> None:
        assert self.services is not None and self.rendezvous is not None
        now = time.time()
        active: list[TrainingJob] = []
        for raw, deleting in self.store.jobs():
            key = f"{raw['metadata']['namespace']}/{raw['metadata']['name']}"
            if deleting:
                await self._finalize(key, raw)
                continue
            try:
                active.append(parse_job(raw))
            except UserError as exc:  # stored before a stricter version: report, don't crash
                self.store.set_status(key, {"phase": "Failed", "message": str(exc)})
        demands: list[JobDemand] = [d for j in active if (d := demand_for(j, now=now))]
        allocation = allocate(
            self.slots, demands, now=now, resize_cooldown_s=self.config.resize_cooldown_s
        )
        for job in active:
            workers = tuple(
                WorkerState(
                    name=p.name,
                    index=p.index,
                    phase=p.phase,  # type: ignore[arg-type]
                    exit_code=p.exit_code,
                    message=p.message,
                    created=p.created,
                    start_time=p.created,
                    deleting=p.deleting,
                )
                for p in self.pods.of_job(job.key)
            )
            round_info, target = None, None
            if job.spec.inject_lattice and not job.current_status().terminal:
                round_info, target = await self.rendezvous.observe(job.job_id)
            actions = reconcile(
                job,
                Observed(workers=workers, round=round_info, rendezvous_target=target),
                allocation.get(job.key, 0),
                now=now,
                services=self.services,
                config=self.config.reconcile,
            )
            await self._apply(job, actions)
            if job.current_status().terminal and not any(w.phase in ACTIVE for w in workers):
                self._release_local_tier(job.job_id)
        self.cycles += 1

    def _release_local_tier(self, job_id: str) -> None:
        """Drop a finished job's node-local checkpoints (in /dev/shm: memory).

        Its workers clean up after a normal end, but not after one was killed: the leftovers
        would hold memory until the job is deleted. The checkpoint service keeps the durable
        copies under their own retention.
        """
        if job_id not in self._tier_released:
            self._tier_released.add(job_id)
            shutil.rmtree(local_job_dir(job_id), ignore_errors=True)

    async def _finalize(self, key: str, raw: Obj) -> None:
        """A deleted job: stop its workers gracefully, release its target, then forget it."""
        pods = self.pods.of_job(key)
        for pod in pods:
            self.pods.delete(pod.name, graceful=True, grace_s=self.config.worker_grace_s)
        if pods:
            return
        assert self.rendezvous is not None
        with contextlib.suppress(UserError):  # never valid: it never had a target
            job_id = parse_job(raw).job_id
            await self.rendezvous.set_target(job_id, None)
            self._tier_released.discard(job_id)
            shutil.rmtree(local_job_dir(job_id), ignore_errors=True)  # see _release_local_tier
        self.store.remove(key)
        log.info("trainingjob %s deleted", key)

    async def _apply(self, job: TrainingJob, actions: list[Action]) -> None:
        assert self.rendezvous is not None
        for action in actions:
            if isinstance(action, SetRendezvousTarget):
                await self.rendezvous.set_target(action.job, action.size)
            elif isinstance(action, DeleteWorker):
                self.pods.delete(
                    action.name, graceful=action.graceful, grace_s=self.config.worker_grace_s
                )
            elif isinstance(action, CreateWorker):
                await self._create(job, action)
            elif isinstance(action, UpdateStatus):
                self.store.set_status(job.key, action.status.to_dict())
            elif isinstance(action, EmitEvent):
                self.store.add_event(job.key, action.type, action.reason, action.message)
                log.info("trainingjob %s: %s: %s", job.key, action.reason, action.message)
            elif isinstance(action, DeleteJob):
                self.store.mark_deleting(job.key)
                self.wake()

    async def _create(self, job: TrainingJob, action: CreateWorker) -> None:
        if self.pods.get(action.name) is not None:
            return  # still stopping: the next cycle asks again
        container = job.training_container
        try:
            cwd = self._workdir(container.image, container.working_dir)
        except UserError as exc:
            self.store.add_event(job.key, "Warning", "ImageNotMapped", str(exc))
            return
        env = self._env(job, action)
        command = list(action.command)
        at = command.index("--no-python") + 1 if "--no-python" in command else 0
        if at < len(command) and command[at] in ("python", "python3"):
            command[at] = sys.executable  # the image's python is this interpreter
        try:
            await self.pods.start(
                action.name, job.key, action.index, command, env, cwd, job.namespace
            )
        except OSError as exc:
            self.store.add_event(job.key, "Warning", "FailedToStart", f"{action.name}: {exc}")

    def _workdir(self, image: str | None, working_dir: str | None) -> Path:
        name = (image or "").split("@")[0]
        if ":" in name.rsplit("/", 1)[-1]:
            name = name.rsplit(":", 1)[0]
        base = self.images.get(name)
        if base is None:
            raise UserError(
                f"image {image!r} is not mapped to a directory: start `lattice up --image "
                f"{name}=DIR`"
            )
        path = base / working_dir if working_dir else base
        if not path.is_dir():
            raise UserError(f"working directory {path} of image {image!r} does not exist")
        return path

    def _env(self, job: TrainingJob, action: CreateWorker) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(INHERITED_PREFIXES) and k not in INHERITED_DROP
        }
        for var in job.training_container.env or []:
            if var.value is not None:
                env[var.name] = var.value
            elif var.value_from is not None:
                log.warning(
                    "%s: env %s uses valueFrom, which runs only on Kubernetes", job.key, var.name
                )
        env.update(action.env)
        assert self.services is not None
        env["LATTICE_NODE_ID"] = action.name
        env["LATTICE_TOKEN"] = job_token(self.token, job.job_id)
        if self.services.checkpoint_endpoint:
            env["LATTICE_CHECKPOINT_ENDPOINT"] = self.services.checkpoint_endpoint
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    # -- what the API shows --------------------------------------------------------------

    def describe(self, key: str) -> dict[str, Any] | None:
        raw = self.store.get(key)
        if raw is None:
            return None
        workers = [
            {
                "name": p.name,
                "index": p.index,
                "phase": "Terminating" if p.deleting and p.exit_code is None else p.phase,
                "pid": p.proc.pid,
                "exitCode": p.exit_code,
                "log": str(p.log_path),
            }
            for p in sorted(self.pods.of_job(key), key=lambda p: p.index)
        ]
        return {"object": raw, "workers": workers, "events": self.store.events(key)}
