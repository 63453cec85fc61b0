"""`reconcile`: the actions that bring one job's workers and status to what they should be.

Pure and level-triggered: the result depends only on the job (spec and status), what was
observed, the allocation and ``now``. Everything reconcile must remember between calls lives in
the status it writes, so applying the actions and reconciling again yields no further actions.
"""

from __future__ import annotations

from dataclasses import dataclass

from lattice.api.job import TrainingJob, worker_name
from lattice.api.status import (
    CapacityLimit,
    Condition,
    LastCheckpoint,
    Phase,
    WorkerFailure,
    utc,
)
from lattice.operator.core.actions import (
    LABEL_INDEX,
    LABEL_JOB,
    Action,
    CreateWorker,
    DeleteJob,
    DeleteWorker,
    EmitEvent,
    SetRendezvousTarget,
    UpdateStatus,
)
from lattice.operator.core.observed import Observed, RoundInfo, WorkerState
from lattice.operator.core.worker import Services, worker_command, worker_env

ACTIVE = ("Pending", "Running", "Unschedulable")
# Which workers go first when a job has more than its target: never-started ones, then the
# highest indexes of running ones (they stop gracefully at a safe point).
_REMOVAL_ORDER = {"Failed": 0, "Unschedulable": 1, "Pending": 2, "Running": 3}


@dataclass(frozen=True)
class ReconcileConfig:
    """Timing knobs. ``unschedulable_timeout_s``: workers unschedulable this long make the job
    run with what does run; ``capacity_retry_s``: after that long, try the full size again."""

    unschedulable_timeout_s: float = 120.0
    capacity_retry_s: float = 600.0


def reconcile(
    job: TrainingJob,
    observed: Observed,
    allocation: int,
    *,
    now: float,
    services: Services,
    config: ReconcileConfig = ReconcileConfig(),
) -> list[Action]:
    """The actions for one job, in the order the adapter applies them."""
    return _Pass(job, observed, allocation, now, services, config).run()


def _script_exit(code: int | None) -> bool:
    """An exit the script chose (1-127), not a kill by a signal (128+) or a lost node (None)."""
    return code is not None and 0 < code < 128


def failure_text(w: WorkerState) -> str:
    code = "no exit code" if w.exit_code is None else f"exit code {w.exit_code}"
    return f"{w.name}: {code}" + (f": {w.message}" if w.message else "")


class _Pass:
    """One reconcile pass; collects actions while deriving the new status from the old."""

    def __init__(
        self,
        job: TrainingJob,
        observed: Observed,
        allocation: int,
        now: float,
        services: Services,
        config: ReconcileConfig,
    ) -> None:
        self.job = job
        self.spec = job.spec
        self.observed = observed
        self.allocation = allocation
        self.now = now
        self.services = services
        self.config = config
        self.old = job.current_status()
        self.st = self.old.model_copy(deep=True)
        self.workers = sorted(observed.workers, key=lambda w: (w.index, w.name))
        self.live = [w for w in self.workers if not w.deleting]
        self.rdzv: list[Action] = []
        self.deletes: list[Action] = []
        self.creates: list[Action] = []
        self.events: list[EmitEvent] = []

    # -- driver ----------------------------------------------------------------------------

    def run(self) -> list[Action]:
        st = self.st
        if self.job.metadata.generation is not None:
            st.observed_generation = self.job.metadata.generation
        ckpt = self.observed.last_checkpoint
        if ckpt is not None:
            st.last_checkpoint = LastCheckpoint(
                step=ckpt.step, time=utc(ckpt.time) if ckpt.time is not None else None
            )
        if self.observed.round is not None:
            st.round = self.observed.round.round
            self._count_round_failures(self.observed.round)
        if self.old.terminal:
            self._clean_up()
        else:
            self._active()
        actions: list[Action] = [*self.rdzv, *self.deletes, *self.creates]
        if st != self.old:
            actions.append(UpdateStatus(st))
        actions.extend(self.events)
        return actions

    def _active(self) -> None:
        st, spec, now = self.st, self.spec, self.now
        limit = st.capacity_limit
        if limit is not None and limit.until.timestamp() <= now:
            st.capacity_limit = None
            self._event("Normal", "CapacityRetry", "trying the full size again")
        deadline = spec.run_policy.active_deadline_seconds
        if deadline and st.start_time and now - st.start_time.timestamp() >= deadline:
            self._finish(
                "Failed",
                "DeadlineExceeded",
                f"ran longer than runPolicy.activeDeadlineSeconds ({deadline}s)",
            )
            return
        if any(w.phase == "Succeeded" for w in self.live):
            self._completing()
            return
        failed_now = self._count_failures()
        if self._give_up():
            return
        self._scale(failed_now)

    # -- failures --------------------------------------------------------------------------

    def _count_round_failures(self, rnd: RoundInfo) -> None:
        """Rounds that failed and re-formed inside the pods count as restarts too.

        The agents replace a crashed training process themselves, so no pod fails; the
        rendezvous service counts those rounds. A count below the last one seen means the
        service restarted (soft state): it becomes the new baseline.
        """
        st, seen = self.st, rnd.failed_rounds
        if seen is None or self.old.terminal:
            return
        if seen > st.round_failures_seen:
            new = seen - st.round_failures_seen
            st.restarts += new
            detail = f": {rnd.last_failure}" if rnd.last_failure else ""
            if rnd.last_failure:
                st.worker_error = rnd.last_failure
            self._event(
                "Warning",
                "RoundFailed",
                f"{new} training round(s) failed and re-formed{detail}",
            )
        st.round_failures_seen = seen

    def _count_failures(self) -> bool:
        """Count failures not counted before; True if there were any."""
        st = self.st
        counted = list(st.counted_failures)
        new = [w for w in self.live if w.phase == "Failed" and w.identity not in counted]
        for w in new:
            counted.append(w.identity)
            st.restarts += 1
            last = st.last_failure
            if last is not None and (last.exit_code, last.message) == (w.exit_code, w.message):
                st.last_failure = WorkerFailure(
                    worker=w.name, exit_code=w.exit_code, message=w.message, count=last.count + 1
                )
            else:
                st.last_failure = WorkerFailure(
                    worker=w.name, exit_code=w.exit_code, message=w.message
                )
            self._event("Warning", "WorkerFailed", f"worker {failure_text(w)}")
        if new:
            st.worker_error = failure_text(new[0])
            # Remember recent failures only; a failed worker is deleted in the same pass, so it
            # can only be observed again through a stale observation right after.
            st.counted_failures = counted[-max(8, 2 * self.spec.max_size) :]
        return bool(new)

    def _give_up(self) -> bool:
        """Fail the job on a user error or when the restart limit is spent."""
        st, limit = self.st, self.spec.run_policy.backoff_limit
        failed = [w for w in self.live if w.phase == "Failed"]
        in_round = [w for w in self.live if w.phase in ("Running", "Failed")]
        signatures = {(w.exit_code, w.message) for w in failed}
        code = failed[0].exit_code if failed else None
        if (
            len(failed) >= 2
            and len(failed) == len(in_round)
            and len(signatures) == 1
            and _script_exit(code)
        ):
            self._finish(
                "Failed",
                "UserError",
                f"every worker failed the same way (exit code {code}): the training script "
                "fails on its own; fix it and resubmit",
            )
            return True
        last = st.last_failure
        if last is not None and _script_exit(last.exit_code) and last.count >= max(2, limit):
            self._finish(
                "Failed",
                "UserError",
                f"the same failure happened {last.count} times in a row (exit code "
                f"{last.exit_code}): fix the training script and resubmit",
            )
            return True
        if st.restarts > limit:
            self._finish(
                "Failed",
                "BackoffLimitExceeded",
                f"{st.restarts} worker failures exceed runPolicy.backoffLimit ({limit})",
            )
            return True
        return False

    # -- sizes -----------------------------------------------------------------------------

    def _target(self) -> int:
        spec = self.spec
        target = min(max(self.allocation, 0), spec.max_size)
        limit = self.st.capacity_limit
        if limit is not None:
            target = min(target, limit.size)
        return target if target >= spec.min_size else 0

    def _check_unschedulable(self, target: int) -> int:
        """Workers that could not be scheduled for too long: run with what runs (report it)."""
        timeout = self.config.unschedulable_timeout_s
        stuck = [
            w
            for w in self.live
            if w.phase == "Unschedulable"
            and w.created is not None
            and self.now - w.created >= timeout
        ]
        if target == 0 or not stuck:
            return target
        runs = sum(1 for w in self.live if w.phase in ("Running", "Pending"))
        size = min(runs, target)
        until = utc(self.now + self.config.capacity_retry_s)
        min_size = self.spec.min_size
        if size >= min_size:
            reason = (
                f"{len(stuck)} worker(s) could not be scheduled for {timeout:.0f}s: running with "
                f"{size} instead of {target} until {until:%H:%M:%S} UTC, then trying again"
            )
        else:
            reason = (
                f"only {size} of minSize {min_size} workers could be scheduled within "
                f"{timeout:.0f}s: waiting, trying again at {until:%H:%M:%S} UTC"
            )
        self.st.capacity_limit = CapacityLimit(size=size, until=until, reason=reason)
        self._event("Warning", "Unschedulable", reason)
        return size if size >= min_size else 0

    def _scale(self, failed_now: bool) -> None:
        st, old = self.st, self.old
        target = self._check_unschedulable(self._target())
        members = [w for w in self.live if w.phase in (*ACTIVE, "Failed")]
        extra = len(members) - target
        remove: list[WorkerState] = []
        if extra > 0:
            order = sorted(members, key=lambda w: (_REMOVAL_ORDER[w.phase], -w.index))
            remove = order[:extra]
        keep = [w for w in members if w not in remove]
        for w in remove:
            self.deletes.append(DeleteWorker(w.name, graceful=w.phase == "Running"))
        for w in keep:
            if w.phase == "Failed":
                self.deletes.append(DeleteWorker(w.name, graceful=False))
                self.creates.append(self._create(w.index))
        taken = {w.index for w in self.workers}
        index = 0
        for _ in range(target - len(keep)):
            while index in taken:
                index += 1
            taken.add(index)
            self.creates.append(self._create(index))

        if target > 0 and self.spec.inject_lattice and self.observed.rendezvous_target != target:
            self.rdzv.append(SetRendezvousTarget(self.job.job_id, target))
        if target != old.target_size:
            self._resized(old.target_size, target)
        st.target_size = target

        running = sum(1 for w in keep if w.phase == "Running")
        rnd = self.observed.round
        st.size = rnd.size if rnd is not None else running
        ready = target > 0 and running == target and (rnd is None or rnd.size == target)
        phase: Phase
        if target == 0:
            phase, message = "Pending", self._waiting_message()
        elif failed_now or (old.phase == "Restarting" and not ready):
            phase = "Restarting"
            message = f"restarting after a worker failure: {running} of {target} workers running"
        elif ready:
            phase, message = "Running", f"training with {target} workers"
            if st.capacity_limit is not None:
                message += " (limited: workers could not be scheduled)"
        elif old.phase in ("Running", "Resizing", "Restarting"):
            phase, message = "Resizing", f"resizing to {target} workers: {running} running"
        else:
            phase, message = "Pending", f"starting: {running} of {target} workers running"
        self._set_phase(phase, phase, message)

    def _resized(self, before: int, after: int) -> None:
        st = self.st
        st.last_resize_time = utc(self.now)
        if before == 0:
            if st.start_time is None:
                st.start_time = utc(self.now)
            self._event("Normal", "Admitted", f"admitted with {after} workers")
        elif after == 0:
            self._event("Warning", "Stopped", f"stopped its {before} workers to wait for capacity")
        else:
            self._event("Normal", "Resized", f"target size {before} -> {after}")

    def _waiting_message(self) -> str:
        limit = self.st.capacity_limit
        if limit is not None and limit.size < self.spec.min_size:
            return limit.reason
        spec = self.spec
        need = spec.min_size * spec.slots_per_worker
        return f"waiting for capacity: minSize {spec.min_size} needs {need} {spec.resource_unit}"

    # -- the end ---------------------------------------------------------------------------

    def _completing(self) -> None:
        """A worker succeeded: training is over. Wait for the rest; start nothing new."""
        live = self.live
        for w in live:
            if w.phase in ("Pending", "Unschedulable"):
                self.deletes.append(DeleteWorker(w.name, graceful=False))
        running = [w for w in live if w.phase == "Running"]
        if running:
            done = sum(1 for w in live if w.phase == "Succeeded")
            self._set_phase(
                self.old.phase,
                "Finishing",
                f"finishing: {done} workers done, {len(running)} running",
            )
            return
        failed = [w for w in live if w.phase == "Failed"]
        if failed:
            self.st.worker_error = failure_text(failed[0])
            self._finish("Failed", "WorkerFailed", f"worker {failure_text(failed[0])}")
        else:
            self._finish("Succeeded", "Succeeded", "all workers finished successfully")

    def _finish(self, phase: Phase, reason: str, message: str) -> None:
        st = self.st
        st.completion_time = utc(self.now)
        self.deletes.clear()
        self.creates.clear()
        self.rdzv.clear()
        self._set_phase(phase, reason, message)
        self._clean_up()

    def _clean_up(self) -> None:
        """A finished job: honour cleanPodPolicy and ttlSecondsAfterFinished."""
        st, policy = self.st, self.spec.run_policy
        st.target_size = 0
        st.size = 0
        st.counted_failures = []
        for w in self.live:
            if policy.clean_pod_policy == "All" or (
                policy.clean_pod_policy == "Running" and w.phase in ACTIVE
            ):
                self.deletes.append(DeleteWorker(w.name, graceful=w.phase == "Running"))
        ttl = policy.ttl_seconds_after_finished
        done = st.completion_time
        if ttl is not None and done is not None and self.now >= done.timestamp() + ttl:
            self.deletes.append(DeleteJob(f"finished more than {ttl}s ago"))

    # -- status helpers --------------------------------------------------------------------

    def _set_phase(self, phase: Phase, reason: str, message: str) -> None:
        st, old = self.st, self.old
        st.message = message
        if phase == old.phase and st.conditions:
            return
        st.phase = phase
        stamp = utc(self.now)
        conditions = [c for c in st.conditions if c.type != phase]
        for c in conditions:
            if c.status == "True":
                c.status = "False"
                c.last_transition_time = stamp
        conditions.append(
            Condition(
                type=phase,
                status="True",
                reason=reason,
                message=message,
                last_transition_time=stamp,
            )
        )
        st.conditions = conditions
        kind = "Warning" if phase in ("Failed", "Restarting") else "Normal"
        self._event(kind, phase, message)

    def _event(self, kind: str, reason: str, message: str) -> None:
        self.events.append(EmitEvent(kind, reason, message))  # type: ignore[arg-type]

    def _create(self, index: int) -> CreateWorker:
        job, services = self.job, self.services
        command = worker_command(
            job,
            rendezvous_endpoint=services.rendezvous_endpoint,
            checkpoint_endpoint=services.checkpoint_endpoint,
            job_id=job.job_id,
            launcher=services.launcher,
        )
        return CreateWorker(
            job=job.key,
            name=worker_name(job.name, index),
            index=index,
            command=tuple(command),
            container=job.training_container.name,
            env=worker_env(job),
            labels={LABEL_JOB: job.name, LABEL_INDEX: str(index)},
        )
