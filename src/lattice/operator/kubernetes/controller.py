"""The Kubernetes adapter's loop: observe the cluster, ask the core, apply its actions.

Level-triggered and global: every cycle lists the TrainingJobs of both API groups, the pods
and the nodes, computes each resource unit's capacity, allocates it across all jobs
(`allocate`), and reconciles every job (`reconcile`). Watches only wake the loop early; a
periodic resync catches anything a watch missed. Nothing is cached between cycles except
which jobs' Secret and Service were already ensured, so a restarted operator (or a new
leader) simply continues from what the cluster holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lattice.api.job import TrainingJob
from lattice.api.load import parse_job
from lattice.common.auth import job_token
from lattice.common.errors import UserError
from lattice.operator.core import (
    DEFAULT_RESIZE_COOLDOWN_S,
    LABEL_JOB,
    Action,
    CheckpointInfo,
    CreateWorker,
    DeleteJob,
    DeleteWorker,
    EmitEvent,
    JobDemand,
    Observed,
    ReconcileConfig,
    RoundInfo,
    Services,
    SetRendezvousTarget,
    UpdateStatus,
    WorkerState,
    allocate,
    demand_for,
    reconcile,
)
from lattice.operator.kubernetes import children
from lattice.operator.kubernetes.api import ApiError, KubeApi
from lattice.operator.kubernetes.checkpoints import CheckpointView
from lattice.operator.kubernetes.metrics import OperatorMetrics
from lattice.operator.kubernetes.observe import (
    TERMINAL_POD_PHASES,
    pool_capacity,
    waiting_reasons,
    worker_state,
)
from lattice.operator.kubernetes.rendezvous import RendezvousView
from lattice.operator.kubernetes.resources import (
    EVENTS,
    NODES,
    PODS,
    SECRETS,
    SERVICES,
    TRAININGJOBS,
    Resource,
)

log = logging.getLogger("lattice.operator.kubernetes")

Obj = dict[str, Any]
WRITE_ATTEMPTS = 5
WATCH_TIMEOUT_S = 300
HEALTHY_WATCH_S = 5.0  # a watch that lasted this long ended normally, not in a failure loop
RETRY_SOON_S = 1.0


def default_identity() -> str:
    """This replica's name in the leader Lease and in Events: the pod name where known."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class OperatorConfig:
    """How the operator runs. ``namespace`` None: TrainingJobs of all namespaces."""

    admin_token: str
    rendezvous_endpoint: str
    checkpoint_endpoint: str | None = None
    namespace: str | None = None
    identity: str = field(default_factory=default_identity)
    resync_s: float = 30.0
    debounce_s: float = 0.1
    resize_cooldown_s: float = DEFAULT_RESIZE_COOLDOWN_S
    reconcile: ReconcileConfig = field(default_factory=ReconcileConfig)
    worker_grace_s: int = children.DEFAULT_WORKER_GRACE_S
    launcher: tuple[str, ...] = ("lattice",)


@dataclass
class _Entry:
    """One TrainingJob object this cycle: its raw form (kept current after our writes), its
    resource (API group), and the parsed model (None if invalid)."""

    raw: Obj
    res: Resource
    job: TrainingJob | None = None

    @property
    def meta(self) -> Obj:
        return self.raw["metadata"]

    @property
    def key(self) -> str:
        return f"{self.meta['namespace']}/{self.meta['name']}"

    @property
    def uid(self) -> str:
        return str(self.meta.get("uid") or "")

    def owns(self, obj: Obj) -> bool:
        return children.controller_uid(obj) == self.uid


def _uid(obj: Obj) -> str:
    return str(obj["metadata"].get("uid") or "")


def _age_rank(entry: _Entry) -> tuple[str, int]:
    return (str(entry.meta.get("creationTimestamp") or ""), TRAININGJOBS.index(entry.res))


class Controller:
    """Runs reconcile cycles until cancelled; ``synced`` once a cycle has completed."""

    def __init__(
        self,
        api: KubeApi,
        config: OperatorConfig,
        *,
        metrics: OperatorMetrics | None = None,
        rendezvous: RendezvousView | None = None,
        checkpoints: CheckpointView | None = None,
    ) -> None:
        self.api = api
        self.config = config
        self.metrics = metrics if metrics is not None else OperatorMetrics()
        self.rendezvous = rendezvous or RendezvousView(
            config.rendezvous_endpoint, config.admin_token
        )
        if checkpoints is None and config.checkpoint_endpoint:
            checkpoints = CheckpointView(config.checkpoint_endpoint, config.admin_token)
        self.checkpoints = checkpoints
        self.services = Services(
            rendezvous_endpoint=config.rendezvous_endpoint,
            checkpoint_endpoint=config.checkpoint_endpoint,
            launcher=config.launcher,
        )
        self.synced = False
        self._wake = asyncio.Event()
        self._ensured: set[str] = set()  # job uids whose Secret and Service exist
        self._retry = False

    # -- the loop ------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        ns = self.config.namespace
        watches = [
            *(self._watch(res, ns) for res in TRAININGJOBS),
            self._watch(PODS, ns, LABEL_JOB),
            self._watch(NODES, None),
        ]
        tasks = [asyncio.create_task(w) for w in watches]
        failures = 0
        try:
            while True:
                self._wake.clear()
                self._retry = False
                try:
                    await self.cycle()
                    self.synced, failures = True, 0
                except ApiError as exc:
                    failures += 1
                    self.metrics.errors.labels("cycle").inc()
                    log.warning("reconcile cycle failed: %s", exc)
                except Exception:  # a bug or an object we cannot read: keep serving the rest
                    failures += 1
                    self.metrics.errors.labels("cycle").inc()
                    log.exception("reconcile cycle failed")
                wait = self.config.resync_s
                if failures or self._retry:
                    wait = min(wait, RETRY_SOON_S * 2 ** min(failures, 5))
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation
                # that arrives just as the wake-up does, and the operator would not stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                await asyncio.sleep(self.config.debounce_s)  # let a burst of changes settle
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch(self, res: Resource, namespace: str | None, labels: str | None = None) -> None:
        """Wake the loop on every change of ``res``; resume after timeouts, relist on 410."""
        version: str | None = None
        backoff = RETRY_SOON_S
        while True:
            started = time.monotonic()
            try:
                async for kind, obj in self.api.watch(
                    res, namespace, labels, version, WATCH_TIMEOUT_S
                ):
                    version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    if kind != "BOOKMARK":
                        self.wake()
            except ApiError as exc:
                if exc.gone:
                    version = None
                    self.wake()
                    continue
                level = logging.DEBUG if exc.not_found else logging.WARNING
                log.log(level, "watch of %s: %s", res.rbac_name, exc)
                if exc.not_found:  # the CRD is not installed (yet)
                    await asyncio.sleep(self.config.resync_s)
                    continue
            except Exception:
                log.exception("watch of %s failed", res.rbac_name)
            else:
                if time.monotonic() - started >= HEALTHY_WATCH_S:
                    backoff = RETRY_SOON_S  # it ran a while (server timeout): resume at once
                    continue
            await asyncio.sleep(backoff)  # failed or ended early: back off
            backoff = min(backoff * 2, 30.0)

    # -- one cycle -----------------------------------------------------------------------

    async def cycle(self) -> None:
        started = time.monotonic()
        now = time.time()
        entries = await self._list_jobs()
        pods, _ = await self.api.list(PODS)  # all pods: capacity counts what others use
        nodes, _ = await self.api.list(NODES)
        ns = self.config.namespace
        workers: dict[str, list[Obj]] = {}
        for pod in pods:
            meta = pod["metadata"]
            job_name = (meta.get("labels") or {}).get(LABEL_JOB)
            if job_name and (ns is None or meta.get("namespace") == ns):
                workers.setdefault(f"{meta['namespace']}/{job_name}", []).append(pod)

        active: list[_Entry] = []
        seen: dict[str, _Entry] = {}
        for entry in sorted(entries, key=_age_rank):
            try:
                if entry.meta.get("deletionTimestamp"):
                    if children.FINALIZER in (entry.meta.get("finalizers") or []):
                        await self._finalize(entry, workers.get(entry.key, []))
                    continue
                try:
                    entry.job = parse_job(entry.raw)
                except UserError as exc:
                    await self._report_invalid(entry, "InvalidSpec", str(exc), now)
                    continue
                other = seen.get(entry.key)
                if other is not None:
                    message = (
                        f"a TrainingJob {entry.key} already exists as {other.raw['apiVersion']}; "
                        "names must be unique across both API groups: delete one of them"
                    )
                    await self._report_invalid(entry, "NameConflict", message, now)
                    continue
                seen[entry.key] = entry
                if await self._ensure_finalizer(entry):
                    active.append(entry)
            except ApiError as exc:
                self._api_failed(entry, exc)

        allocation = self._allocate(active, nodes, pods, workers, now)
        observed, checkpoints = await asyncio.gather(
            self._observe_rendezvous(active), self._observe_checkpoints(active)
        )
        phases: dict[str, int] = {}
        for entry in active:
            job = entry.job
            assert job is not None
            mine = [p for p in workers.get(entry.key, []) if entry.owns(p)]
            if any("CreateContainerConfigError" in waiting_reasons(p) for p in mine):
                self._ensured.discard(entry.uid)  # its Secret is gone: create it again
            container = job.training_container.name
            states: tuple[WorkerState, ...] = tuple(worker_state(p, container) for p in mine)
            round_info, target = observed.get(entry.key, (None, None))
            actions = reconcile(
                job,
                Observed(
                    workers=states,
                    round=round_info,
                    rendezvous_target=target,
                    last_checkpoint=checkpoints.get(entry.key),
                ),
                allocation.get(entry.key, 0),
                now=now,
                services=self.services,
                config=self.config.reconcile,
            )
            try:
                await self._apply(entry, job, actions, now)
            except ApiError as exc:
                self._api_failed(entry, exc)
            phase = (entry.raw.get("status") or {}).get("phase") or "Pending"
            phases[phase] = phases.get(phase, 0) + 1
        self.metrics.jobs.clear()
        for phase, count in phases.items():
            self.metrics.jobs.labels(phase).set(count)
        self.metrics.cycles.inc()
        self.metrics.cycle_seconds.observe(time.monotonic() - started)

    def _api_failed(self, entry: _Entry, exc: ApiError) -> None:
        self.metrics.errors.labels("job").inc()
        self._retry = True
        log.warning("trainingjob %s: %s", entry.key, exc)

    async def _list_jobs(self) -> list[_Entry]:
        entries: list[_Entry] = []
        for res in TRAININGJOBS:
            try:
                items, _ = await self.api.list(res, self.config.namespace)
            except ApiError as exc:
                if exc.not_found:  # that group's CRD is not installed
                    continue
                raise
            entries += [_Entry(raw=item, res=res) for item in items]
        return entries

    def _allocate(
        self,
        active: list[_Entry],
        nodes: list[Obj],
        pods: list[Obj],
        workers: dict[str, list[Obj]],
        now: float,
    ) -> dict[str, int]:
        """Each resource unit is one pool: its capacity, shared by the jobs counting in it."""
        by_unit: dict[str, list[_Entry]] = {}
        for entry in active:
            assert entry.job is not None
            by_unit.setdefault(entry.job.spec.resource_unit, []).append(entry)
        allocation: dict[str, int] = {}
        self.metrics.capacity.clear()
        for unit, members in by_unit.items():
            pool = {_uid(p) for e in members for p in workers.get(e.key, []) if e.owns(p)}
            capacity = pool_capacity(unit, nodes, pods, lambda p, pool=pool: _uid(p) in pool)
            self.metrics.capacity.labels(unit).set(capacity)
            demands: list[JobDemand] = []
            for entry in members:
                assert entry.job is not None
                demand = demand_for(entry.job, now=now)
                if demand is not None:
                    demands.append(demand)
            allocation.update(
                allocate(
                    capacity, demands, now=now, resize_cooldown_s=self.config.resize_cooldown_s
                )
            )
        return allocation

    async def _observe_rendezvous(
        self, active: Iterable[_Entry]
    ) -> dict[str, tuple[RoundInfo | None, int | None]]:
        asked = [
            e
            for e in active
            if e.job is not None
            and e.job.spec.inject_lattice
            and not e.job.current_status().terminal
        ]
        answers = await asyncio.gather(
            *(self.rendezvous.observe(e.job.job_id) for e in asked if e.job is not None)
        )
        return {e.key: a for e, a in zip(asked, answers, strict=True)}

    async def _observe_checkpoints(self, active: Iterable[_Entry]) -> dict[str, CheckpointInfo]:
        view = self.checkpoints
        if view is None:
            return {}
        asked = [
            e.job
            for e in active
            if e.job is not None
            and e.job.spec.inject_lattice
            and e.job.spec.checkpoint.enabled
            and not e.job.current_status().terminal
        ]
        answers = await asyncio.gather(*(view.latest(job.job_id) for job in asked))
        return {job.key: info for job, info in zip(asked, answers, strict=True) if info}

    # -- applying actions ----------------------------------------------------------------

    async def _apply(
        self, entry: _Entry, job: TrainingJob, actions: list[Action], now: float
    ) -> None:
        for action in actions:
            name = type(action).__name__
            if isinstance(action, SetRendezvousTarget):
                if not await self.rendezvous.set_target(action.job, action.size):
                    self.metrics.errors.labels("rendezvous").inc()
                    continue
            elif isinstance(action, DeleteWorker):
                await self._delete_pod(entry, action.name, graceful=action.graceful)
            elif isinstance(action, CreateWorker):
                await self._create_worker(entry, job, action)
            elif isinstance(action, UpdateStatus):
                if not await self._write_status(entry, action.status.to_dict()):
                    continue
            elif isinstance(action, EmitEvent):
                await self._emit(entry, action, now)
            elif isinstance(action, DeleteJob):
                log.info("trainingjob %s: deleting (%s)", entry.key, action.reason)
                with contextlib.suppress(ApiError):
                    await self.api.delete(entry.res, entry.meta["name"], entry.meta["namespace"])
            self.metrics.actions.labels(name).inc()

    async def _delete_pod(self, entry: _Entry, name: str, *, graceful: bool) -> None:
        """Graceful: the pod's own grace period (the agent checkpoints on SIGTERM)."""
        try:
            await self.api.delete(
                PODS, name, entry.meta["namespace"], grace_period_s=None if graceful else 0
            )
        except ApiError as exc:
            if not exc.not_found:
                raise

    async def _create_worker(self, entry: _Entry, job: TrainingJob, action: CreateWorker) -> None:
        await self._ensure_children(entry, job)
        pod = children.worker_pod(
            job,
            entry.raw,
            action,
            checkpoint_endpoint=self.config.checkpoint_endpoint,
            grace_s=self.config.worker_grace_s,
        )
        try:
            await self.api.create(PODS, pod)
        except ApiError as exc:
            if not exc.already_exists:  # still terminating: the next cycle asks again
                raise

    async def _ensure_children(self, entry: _Entry, job: TrainingJob) -> None:
        """The job's token Secret and headless Service, once per job (uid) and operator run."""
        if entry.uid in self._ensured:
            return
        token = job_token(self.config.admin_token, job.job_id)
        secret = children.token_secret(entry.raw, token)
        try:
            await self.api.create(SECRETS, secret)
        except ApiError as exc:
            if not exc.already_exists:
                raise
            await self.api.replace(SECRETS, secret)  # a stale one (e.g. of a deleted job)
        service = children.headless_service(entry.raw)
        try:
            await self.api.create(SERVICES, service)
        except ApiError as exc:
            if not exc.already_exists:
                raise
            current = await self.api.get(SERVICES, service["metadata"]["name"], job.namespace)
            if not entry.owns(current):
                current["metadata"]["ownerReferences"] = service["metadata"]["ownerReferences"]
                current["metadata"]["labels"] = service["metadata"]["labels"]
                current.setdefault("spec", {})["selector"] = service["spec"]["selector"]
                await self.api.replace(SERVICES, current)
        self._ensured.add(entry.uid)

    async def _write_status(self, entry: _Entry, status: Obj) -> bool:
        """PUT the status subresource; on a stale resourceVersion re-read the job and retry."""
        raw = entry.raw
        for _ in range(WRITE_ATTEMPTS):
            try:
                entry.raw = await self.api.replace(entry.res.status(), {**raw, "status": status})
                return True
            except ApiError as exc:
                if exc.not_found:
                    return False
                if not exc.conflict:
                    raise
                self.metrics.conflicts.inc()
            raw = await self._reread(entry)
            if raw is None:
                return False
        self._retry = True
        log.warning("trainingjob %s: status still conflicting after retries", entry.key)
        return False

    async def _reread(self, entry: _Entry) -> Obj | None:
        """The job as stored now; None if it is gone or was replaced (another uid)."""
        try:
            raw = await self.api.get(entry.res, entry.meta["name"], entry.meta["namespace"])
        except ApiError as exc:
            if exc.not_found:
                return None
            raise
        if str(raw["metadata"].get("uid")) != entry.uid:
            return None
        entry.raw = raw
        return raw

    async def _emit(self, entry: _Entry, action: EmitEvent, now: float) -> None:
        obj = children.event(entry.raw, action, now=now, instance=self.config.identity)
        try:
            await self.api.create(EVENTS, obj)
        except ApiError as exc:  # events are best effort
            self.metrics.errors.labels("event").inc()
            log.debug("event for %s not recorded: %s", entry.key, exc)

    # -- finalizer and problems ----------------------------------------------------------

    async def _set_finalizers(self, entry: _Entry, add: bool) -> bool:
        """Add or remove our finalizer with a conflict-safe PUT; False if the job is gone."""
        raw: Obj | None = entry.raw
        for _ in range(WRITE_ATTEMPTS):
            assert raw is not None
            finalizers = [
                f for f in raw["metadata"].get("finalizers") or [] if f != children.FINALIZER
            ]
            if add:
                finalizers.append(children.FINALIZER)
            body = copy.deepcopy(raw)
            body["metadata"]["finalizers"] = finalizers
            try:
                entry.raw = await self.api.replace(entry.res, body)
                return True
            except ApiError as exc:
                if exc.not_found:
                    return False
                if not exc.conflict:
                    raise
                self.metrics.conflicts.inc()
            raw = await self._reread(entry)
            if raw is None:
                return False
            if (children.FINALIZER in (raw["metadata"].get("finalizers") or [])) == add:
                return True
            if add and raw["metadata"].get("deletionTimestamp"):
                return False  # being deleted meanwhile: no new finalizers
        self._retry = True
        return False

    async def _ensure_finalizer(self, entry: _Entry) -> bool:
        if children.FINALIZER in (entry.meta.get("finalizers") or []):
            return True
        return await self._set_finalizers(entry, add=True)

    async def _finalize(self, entry: _Entry, pods: list[Obj]) -> None:
        """The job is being deleted: release its rendezvous target, stop the workers that
        cleanPodPolicy selects (gracefully, so running ones checkpoint), drop the finalizer.
        Everything else it owns goes with Kubernetes' garbage collection."""
        try:
            job: TrainingJob | None = parse_job(entry.raw)
        except UserError:
            job = None
        if job is not None and job.spec.inject_lattice:
            await self.rendezvous.set_target(job.job_id, None)
        policy = job.spec.run_policy.clean_pod_policy if job is not None else "All"
        for pod in pods:
            if not entry.owns(pod) or pod["metadata"].get("deletionTimestamp"):
                continue
            phase = (pod.get("status") or {}).get("phase")
            if policy == "All" or (policy == "Running" and phase not in TERMINAL_POD_PHASES):
                await self._delete_pod(entry, pod["metadata"]["name"], graceful=phase == "Running")
        if await self._set_finalizers(entry, add=False):
            self._ensured.discard(entry.uid)
            log.info("trainingjob %s: cleaned up", entry.key)

    async def _report_invalid(self, entry: _Entry, reason: str, message: str, now: float) -> None:
        """A job the operator cannot run: Failed, with the reason in its status and an Event
        (once: nothing is written while the status already says so)."""
        status = entry.raw.get("status") or {}
        if status.get("phase") == "Failed" and status.get("message") == message:
            return
        stamp = children.rfc3339(now)
        new = {
            "phase": "Failed",
            "message": message,
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": stamp,
                }
            ],
        }
        if await self._write_status(entry, new):
            await self._emit(entry, EmitEvent("Warning", reason, message), now)
            log.warning("trainingjob %s: %s", entry.key, message)
