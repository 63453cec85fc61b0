"""A tiny in-memory world that applies reconcile's actions the way an adapter does.

Created workers appear Pending; deletes remove them at once (or, with ``slow_deletes``, mark
them terminating first); status updates replace the job's status; events are recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from lattice.api import TrainingJob, load_documents
from lattice.operator.core import (
    Action,
    CreateWorker,
    DeleteJob,
    DeleteWorker,
    EmitEvent,
    Observed,
    ReconcileConfig,
    RoundInfo,
    Services,
    SetRendezvousTarget,
    UpdateStatus,
    WorkerState,
    reconcile,
)

SERVICES = Services(rendezvous_endpoint="rdzv.lattice:29400", checkpoint_endpoint="ckpt:29500")

DOC = """
apiVersion: exabits.ai/v1
kind: TrainingJob
metadata: {name: demo, namespace: lattice, generation: 1}
spec:
  minSize: 1
  maxSize: 4
  replicaSpecs:
    template:
      spec:
        containers:
          - name: trainingjob
            image: exabits/lattice-resnet
            command: ["python", "-u", "main.py"]
"""


def make_job(**spec: object) -> TrainingJob:
    (job,) = load_documents(DOC)
    obj = job.to_dict()
    obj["spec"].update(spec)
    return TrainingJob.model_validate(obj)


@dataclass
class World:
    job: TrainingJob
    now: float = 1000.0
    workers: dict[str, WorkerState] = field(default_factory=dict)
    rendezvous_target: int | None = None
    events: list[EmitEvent] = field(default_factory=list)
    job_deleted: bool = False
    slow_deletes: bool = False
    track_round: bool = False
    config: ReconcileConfig = field(default_factory=ReconcileConfig)
    _uid: int = 0

    def observed(self) -> Observed:
        rnd = None
        if self.track_round:
            members = [w for w in self.workers.values() if w.phase == "Running"]
            rnd = RoundInfo(round=len(self.events), size=len(members))
        return Observed(
            workers=tuple(self.workers.values()),
            round=rnd,
            rendezvous_target=self.rendezvous_target,
        )

    def reconcile(self, allocation: int) -> list[Action]:
        return reconcile(
            self.job,
            self.observed(),
            allocation,
            now=self.now,
            services=SERVICES,
            config=self.config,
        )

    def apply(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, CreateWorker):
                if a.name in self.workers:
                    continue  # still terminating: the adapter skips, a later pass retries
                self._uid += 1
                self.workers[a.name] = WorkerState(
                    a.name, a.index, "Pending", created=self.now, uid=str(self._uid)
                )
            elif isinstance(a, DeleteWorker):
                w = self.workers.get(a.name)
                if w is None:
                    continue
                if self.slow_deletes and a.graceful:
                    self.workers[a.name] = replace(w, deleting=True)
                else:
                    del self.workers[a.name]
            elif isinstance(a, SetRendezvousTarget):
                self.rendezvous_target = a.size
            elif isinstance(a, UpdateStatus):
                self.job = self.job.model_copy(update={"status": a.status})
            elif isinstance(a, EmitEvent):
                self.events.append(a)
            elif isinstance(a, DeleteJob):
                self.job_deleted = True

    def step(self, allocation: int) -> list[Action]:
        actions = self.reconcile(allocation)
        self.apply(actions)
        return actions

    def set(self, name: str, phase: str, exit_code: int | None = None, message: str = "") -> None:
        w = self.workers[name]
        start = self.now if phase == "Running" and w.start_time is None else w.start_time
        self.workers[name] = replace(
            w, phase=phase, exit_code=exit_code, message=message, start_time=start
        )

    def run_all(self) -> bool:
        """Start every pending worker; True if there was one."""
        pending = [n for n, w in self.workers.items() if w.phase == "Pending" and not w.deleting]
        for name in pending:
            self.set(name, "Running")
        return bool(pending)

    def finish_deletes(self) -> None:
        self.workers = {n: w for n, w in self.workers.items() if not w.deleting}

    def settle(self, allocation: int, *, run: bool = True, limit: int = 20) -> None:
        """Reconcile (and start pending workers) until nothing changes."""
        for _ in range(limit):
            actions = self.step(allocation)
            started = self.run_all() if run else False
            if not actions and not started:
                return
        raise AssertionError(f"no fixed point after {limit} passes: {actions}")

    @property
    def status(self):  # type: ignore[no-untyped-def]
        return self.job.current_status()

    def names(self) -> list[str]:
        return sorted(self.workers)
