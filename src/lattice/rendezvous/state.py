"""The rendezvous state machine: jobs, waiting nodes, rounds and how they close and end.

Everything here runs on the service's event loop, so no locks: handlers call these methods,
which change state synchronously and fire the signals that parked long-polls wait on.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from lattice.rendezvous.metrics import RendezvousMetrics
from lattice.rendezvous.models import JoinBody, RegisterBody
from lattice.rendezvous.parking import Lot, Signal

log = logging.getLogger("lattice.rendezvous")

KV_MAX_VALUE = 64 * 1024
KV_MAX_KEYS = 1024
MAX_JOBS = 10_000
HISTORY = 64  # ended rounds remembered per job (a late wait_round_end still gets its reason)
JOB_IDLE_TTL_S = 3600.0  # a job without nodes, rounds or requests for this long is forgotten
_EPOCH_2025 = 1_735_689_600.0
_NEW = 1 << 62  # order of a node never in a round: after every node that was


def generation_floor() -> int:
    """Milliseconds since 2025: where a job's generations start in a fresh service.

    The service keeps no disk state, yet must never reuse a generation after a restart. A
    round takes far more than a millisecond, so a floor taken from the clock at (re)start is
    above every generation the previous instance issued; agents also re-assert theirs.
    """
    return int((time.time() - _EPOCH_2025) * 1000)


class Conflict(Exception):
    """A request that contradicts the job's state (HTTP 409)."""


class Refused(Exception):
    """A request over a limit (HTTP status given)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Member:
    node_id: str
    rank: int
    nproc: int
    addr: str
    port: int

    def to_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "rank": self.rank,
            "nproc": self.nproc,
            "addr": self.addr,
            "port": self.port,
        }


@dataclass(frozen=True)
class End:
    generation: int
    reason: str  # failure | node_lost | left | resize | succeeded
    detail: str
    graceful: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "reason": self.reason,
            "detail": self.detail,
            "graceful": self.graceful,
        }


@dataclass
class RoundState:
    generation: int
    members: list[Member]
    signal: Signal
    formed_at: float
    succeeded: set[str] = field(default_factory=set)
    end: End | None = None
    ended_at: float | None = None
    _ready: bytes | None = field(default=None, repr=False)
    _ready_gzip: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.ids = {m.node_id for m in self.members}

    @property
    def running(self) -> bool:
        return self.end is None

    def to_json(self, job: str) -> dict[str, Any]:
        return {
            "job": job,
            "generation": self.generation,
            "members": [m.to_json() for m in self.members],
        }

    def ready_body(self, job: str, lease_s: float) -> bytes:
        """The join answer for every member, encoded once (a thousand members get the same)."""
        if self._ready is None:
            answer = {"status": "ready", "round": self.to_json(job), "lease_s": lease_s}
            self._ready = json.dumps(answer, separators=(",", ":")).encode()
        return self._ready

    def ready_body_gzip(self, job: str, lease_s: float) -> bytes:
        """The same answer gzipped once: a 1024-node round is 80 KB plain, a tenth of that
        compressed, and every member downloads it."""
        if self._ready_gzip is None:
            self._ready_gzip = gzip.compress(self.ready_body(job, lease_s), mtime=0)
        return self._ready_gzip


@dataclass
class NodeState:
    node_id: str
    nproc: int
    addr: str
    port: int
    last_seen: float
    wake: Signal
    join_id: str | None = None
    waiting_since: float | None = None  # None: not waiting for a round
    assigned: int | None = None  # generation given to the current join_id
    last_generation: int | None = None  # the newest round this node had before joining

    @property
    def waiting(self) -> bool:
        return self.waiting_since is not None


class Job:
    """One job's membership, rounds and KV."""

    def __init__(self, name: str, lot: Lot, now: float) -> None:
        self.name = name
        self.nodes: dict[str, NodeState] = {}
        self.waiters: dict[str, NodeState] = {}  # the nodes waiting for a round, by arrival
        self.order: dict[str, int] = {}  # node -> position of first appearance in a round
        self.next_order = 0
        self.round: RoundState | None = None
        self.history: OrderedDict[int, End] = OrderedDict()
        self.highest = generation_floor()
        self.target: int | None = None
        self.min_nodes = 1
        self.max_nodes = 1
        self.last_new_join = now
        self.timer: asyncio.TimerHandle | None = None
        self.kv: dict[str, bytes] = {}
        self.kv_signal = Signal(lot)
        self.last_activity = now
        self.failed_rounds = 0  # rounds ended by a worker failure (the operator's restarts)
        self.last_failure = ""  # the detail of the newest of them

    def running(self) -> RoundState | None:
        return self.round if self.round is not None and self.round.running else None

    def waiting(self) -> list[NodeState]:
        return list(self.waiters.values())

    def start_waiting(self, node: NodeState, now: float) -> None:
        node.waiting_since = now
        self.waiters[node.node_id] = node

    def stop_waiting(self, node: NodeState) -> None:
        node.waiting_since = None
        self.waiters.pop(node.node_id, None)

    def forget(self, node_id: str) -> NodeState | None:
        node = self.nodes.pop(node_id, None)
        if node is not None:
            self.stop_waiting(node)
            node.wake.fire()
        return node

    def cap(self) -> int:
        """How many nodes the next round takes: max, or the operator's target within min..max."""
        if self.target is None:
            return self.max_nodes
        return max(self.min_nodes, min(self.target, self.max_nodes))

    def previous_live(self) -> set[str]:
        """Members of the ended last round that are still alive and expected to re-join."""
        rnd = self.round
        if rnd is None or rnd.running or rnd.end is None or rnd.end.reason == "succeeded":
            return set()
        return {m for m in rnd.ids if m in self.nodes and m not in rnd.succeeded}

    def status(self, now: float) -> dict[str, Any]:
        rnd = self.round
        return {
            "job": self.name,
            "generation": rnd.generation if rnd is not None else None,
            "running": rnd is not None and rnd.running,
            "members": [m.to_json() for m in rnd.members] if rnd is not None else [],
            "succeeded": sorted(rnd.succeeded) if rnd is not None else [],
            "last_end": rnd.end.to_json() if rnd is not None and rnd.end is not None else None,
            "failed_rounds": self.failed_rounds,
            "last_failure": self.last_failure or None,
            "waiting": [
                {
                    "node_id": n.node_id,
                    "nproc": n.nproc,
                    "waiting_s": round(now - (n.waiting_since or now), 3),
                }
                for n in sorted(self.waiting(), key=lambda n: n.waiting_since or 0.0)
            ],
            "target": self.target,
            "min_nodes": self.min_nodes,
            "max_nodes": self.max_nodes,
            "kv_keys": len(self.kv),
        }


class Rendezvous:
    """All jobs of one service instance."""

    def __init__(
        self,
        *,
        settle_s: float,
        lease_s: float,
        rejoin_grace_s: float,
        metrics: RendezvousMetrics | None = None,
    ) -> None:
        self.settle_s = settle_s
        self.lease_s = lease_s
        self.rejoin_grace_s = rejoin_grace_s
        self.metrics = metrics
        self.lot = Lot()
        self.jobs: dict[str, Job] = {}
        self.started_at = time.monotonic()

    @staticmethod
    def now() -> float:
        return time.monotonic()

    # ------------------------------------------------------------------ jobs

    def job(self, name: str, *, create: bool = True) -> Job | None:
        job = self.jobs.get(name)
        now = self.now()
        if job is None and create:
            if len(self.jobs) >= MAX_JOBS:
                raise Refused(503, f"the service already holds {MAX_JOBS} jobs; try again later")
            job = self.jobs[name] = Job(name, self.lot, now)
        if job is not None:
            job.last_activity = now
        return job

    def must_job(self, name: str) -> Job:
        job = self.job(name)
        assert job is not None
        return job

    # ------------------------------------------------------------------ joining

    def join(self, job: Job, body: JoinBody) -> NodeState:
        """Register (or re-poll) a node's wish to be in the next round."""
        now = self.now()
        job.min_nodes, job.max_nodes = body.min_nodes, body.max_nodes
        if body.last_generation is not None:
            job.highest = max(job.highest, body.last_generation)
        node = job.nodes.get(body.node_id)
        if node is not None and node.join_id == body.join_id:
            node.last_seen = now
            if node.assigned is not None and (
                job.round is None or job.round.generation != node.assigned
            ):
                node.assigned = None  # its round is gone: wait again
                job.start_waiting(node, now)
                self.evaluate(job)
            return node
        rnd = job.running()
        if (
            node is not None
            and rnd is not None
            and node.node_id in rnd.ids
            and node.node_id not in rnd.succeeded
        ):
            self.end_round(job, "node_lost", f"node {node.node_id} joined again (restarted)")
        if node is None:
            node = NodeState(body.node_id, body.nproc, body.addr, body.port, now, Signal(self.lot))
            job.nodes[body.node_id] = node
        node.nproc, node.addr, node.port, node.last_seen = body.nproc, body.addr, body.port, now
        node.join_id, node.assigned = body.join_id, None
        job.stop_waiting(node)  # a new join_id: counts as arriving now
        job.start_waiting(node, now)
        node.last_generation = body.last_generation
        job.last_new_join = now
        rnd = job.running()
        if rnd is not None and node.node_id not in rnd.ids and len(rnd.members) < job.cap():
            self.end_round(
                job,
                "resize",
                f"node {node.node_id} joined; re-forming with up to {job.cap()} nodes",
                graceful=True,
            )
        self.evaluate(job)
        return node

    def round_for(self, job: Job, node: NodeState) -> RoundState | None:
        """The round a join poll returns: the one assigned to this node's join, if current."""
        rnd = job.round
        if job.nodes.get(node.node_id) is not node or node.assigned is None or rnd is None:
            return None
        return rnd if rnd.generation == node.assigned else None

    def withdraw(self, job: Job, node_id: str, join_id: str) -> None:
        """A join given up (timeout, cancelled): forget it, and any round it was just given."""
        node = job.nodes.get(node_id)
        if node is not None and node.join_id == join_id:
            self.leave(job, node_id, why=f"node {node_id} stopped waiting for its round")

    def evaluate(self, job: Job) -> None:
        """Close a round if its conditions hold; otherwise arm a timer for when they might."""
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        if job.running() is not None:
            return
        count = len(job.waiters)
        if count < job.min_nodes:
            return
        now = self.now()
        if count >= job.cap():
            self._close(job, "target" if job.target is not None else "max", now)
            return
        live = job.previous_live()
        if live and len(live) <= count and all(m in job.waiters for m in live):
            self._close(job, "rejoin", now)
            return
        due = job.last_new_join + self.settle_s
        if live:  # a previous member is alive but not back yet: give it time to re-join
            ended_at = job.round.ended_at if job.round is not None else None
            due = max(due, (ended_at or now) + self.rejoin_grace_s)
        recovered_at = self.started_at + self.lease_s  # after a restart: rounds re-register
        if now < recovered_at and any(n.last_generation is not None for n in job.waiting()):
            due = max(due, recovered_at)
        if now >= due:
            self._close(job, "settle", now)
            return
        loop = asyncio.get_running_loop()
        job.timer = loop.call_later(due - now, self._timer_fired, job)

    def _timer_fired(self, job: Job) -> None:
        job.timer = None
        if self.jobs.get(job.name) is job:
            self.evaluate(job)

    def _close(self, job: Job, trigger: str, now: float) -> None:
        waiting = job.waiting()
        waiting.sort(key=lambda n: (job.order.get(n.node_id, _NEW), n.waiting_since or 0.0))
        chosen = waiting[: job.cap()]
        job.highest += 1
        gen = job.highest
        members = [Member(n.node_id, i, n.nproc, n.addr, n.port) for i, n in enumerate(chosen)]
        for n in chosen:
            if n.node_id not in job.order:
                job.order[n.node_id] = job.next_order
                job.next_order += 1
        first = min(n.waiting_since or now for n in chosen)
        job.round = RoundState(gen, members, Signal(self.lot), now)
        for n in chosen:
            job.stop_waiting(n)
            n.assigned = gen
            n.wake.fire()
        log.info(
            "job %s: round %d closed (%s) with %d node(s), %d standing by",
            job.name,
            gen,
            trigger,
            len(members),
            len(waiting) - len(chosen),
        )
        if self.metrics is not None:
            self.metrics.rounds_closed.labels(trigger).inc()
            self.metrics.close_latency.observe(now - first)

    # ------------------------------------------------------------------ ending rounds

    def end_round(self, job: Job, reason: str, detail: str, *, graceful: bool = False) -> None:
        """End the running round for all its members, then see whether the next can close."""
        if self._mark_ended(job, reason, detail, graceful):
            self.evaluate(job)

    def _mark_ended(self, job: Job, reason: str, detail: str, graceful: bool) -> bool:
        rnd = job.running()
        if rnd is None:
            return False
        rnd.end = End(rnd.generation, reason, detail, graceful)
        rnd.ended_at = self.now()
        if reason == "failure":
            job.failed_rounds += 1
            job.last_failure = detail
        job.history[rnd.generation] = rnd.end
        while len(job.history) > HISTORY:
            job.history.popitem(last=False)
        rnd.signal.fire()
        log.info("job %s: round %d ended: %s (%s)", job.name, rnd.generation, reason, detail)
        if self.metrics is not None:
            self.metrics.round_ends.labels(reason).inc()
        return True

    def failure(self, job: Job, generation: int, node_id: str, detail: str) -> None:
        rnd = job.running()
        self._touch(job, node_id)
        if rnd is not None and rnd.generation == generation and node_id in rnd.ids:
            self.end_round(job, "failure", f"{node_id}: {detail}" if detail else node_id)

    def succeeded(self, job: Job, generation: int, node_id: str) -> None:
        rnd = job.running()
        self._touch(job, node_id)
        if rnd is None or rnd.generation != generation or node_id not in rnd.ids:
            return
        rnd.succeeded.add(node_id)
        if rnd.succeeded == rnd.ids:
            self.end_round(job, "succeeded", "every member succeeded")

    def leave(self, job: Job, node_id: str, *, why: str | None = None) -> None:
        job.forget(node_id)
        job.order.pop(node_id, None)
        rnd = job.running()
        if rnd is not None and node_id in rnd.ids and node_id not in rnd.succeeded:
            self.end_round(job, "left", why or f"node {node_id} left")
        else:
            self.evaluate(job)

    def lose(self, job: Job, node_id: str) -> None:
        """A node missed its heartbeats for a whole lease."""
        job.forget(node_id)
        rnd = job.running()
        if rnd is not None and node_id in rnd.ids and node_id not in rnd.succeeded:
            self.end_round(
                job, "node_lost", f"node {node_id} sent no heartbeat for {self.lease_s:g} s"
            )
        else:
            self.evaluate(job)

    # ------------------------------------------------------------------ liveness

    def _touch(self, job: Job, node_id: str) -> bool:
        node = job.nodes.get(node_id)
        if node is None:
            return False
        node.last_seen = self.now()
        return True

    def heartbeat(self, job: Job, node_id: str) -> bool:
        """False if the service does not know the node (it restarted, or the node was lost)."""
        return self._touch(job, node_id)

    def sweep(self) -> None:
        """Expire silent nodes and forget idle jobs (run every fraction of a lease)."""
        now = self.now()
        for job in list(self.jobs.values()):
            for node in list(job.nodes.values()):
                if now - node.last_seen > self.lease_s:
                    self.lose(job, node.node_id)
            if not job.nodes and job.running() is None and now - job.last_activity > JOB_IDLE_TTL_S:
                if job.timer is not None:
                    job.timer.cancel()
                del self.jobs[job.name]

    # ------------------------------------------------------------------ restarts

    def register(self, job: Job, body: RegisterBody) -> tuple[str, End | None]:
        """A client re-asserts its running round; adopt it if the service does not know it."""
        now = self.now()
        job.min_nodes, job.max_nodes = body.min_nodes, body.max_nodes
        gen = body.generation
        rnd = job.round
        if rnd is not None and rnd.generation == gen:
            if body.node_id not in rnd.ids:
                raise Conflict(f"node {body.node_id!r} is not a member of round {gen}")
            if rnd.end is not None:
                return "ended", rnd.end
            self._ensure_member_node(
                job, next(m for m in rnd.members if m.node_id == body.node_id), now
            )
            return "known", None
        if gen in job.history:
            return "ended", job.history[gen]
        if rnd is not None and rnd.generation > gen:
            detail = f"round {gen} was replaced by round {rnd.generation} while this node was away"
            return "ended", End(gen, "node_lost", detail, False)
        self._mark_ended(job, "node_lost", f"superseded by re-registered round {gen}", False)
        members = [Member(m.node_id, m.rank, m.nproc, m.addr, m.port) for m in body.members]
        members.sort(key=lambda m: m.rank)
        job.highest = max(job.highest, gen)
        job.round = RoundState(gen, members, Signal(self.lot), now)
        for i, m in enumerate(members):
            job.order.pop(m.node_id, None)
            job.order[m.node_id] = -len(members) + i  # adopted ranks come first, in order
            self._ensure_member_node(job, m, now)
        log.info(
            "job %s: adopted running round %d (%d nodes) re-registered by %s",
            job.name,
            gen,
            len(members),
            body.node_id,
        )
        if self.metrics is not None:
            self.metrics.rounds_closed.labels("adopted").inc()
        rejoined = [m.node_id for m in members if job.nodes[m.node_id].waiting]
        if rejoined:
            self.end_round(job, "node_lost", f"node {rejoined[0]} joined again (restarted)")
        elif job.waiters and len(members) < job.cap():
            self.end_round(job, "resize", "nodes are waiting to join", graceful=True)
        return "adopted", None

    def _ensure_member_node(self, job: Job, m: Member, now: float) -> None:
        node = job.nodes.get(m.node_id)
        if node is None:
            node = NodeState(m.node_id, m.nproc, m.addr, m.port, now, Signal(self.lot))
            job.nodes[m.node_id] = node
        node.last_seen = now
        if not node.waiting:
            node.assigned = job.round.generation if job.round is not None else None

    # ------------------------------------------------------------------ operator

    def set_target(self, job: Job, size: int | None) -> None:
        job.target = size
        rnd = job.running()
        if rnd is None:
            self.evaluate(job)
            return
        cap, have = job.cap(), len(rnd.members)
        if cap < have:
            self.end_round(job, "resize", f"target size {size} is below {have}", graceful=True)
        elif cap > have and job.waiters:
            self.end_round(
                job, "resize", f"target size {size}: adding waiting nodes", graceful=True
            )

    # ------------------------------------------------------------------ KV

    def kv_set(self, job: Job, key: str, value: bytes) -> None:
        if len(value) > KV_MAX_VALUE:
            raise Refused(413, f"value of {len(value)} bytes is larger than {KV_MAX_VALUE}")
        if key not in job.kv and len(job.kv) >= KV_MAX_KEYS:
            raise Refused(409, f"job {job.name} already has {KV_MAX_KEYS} keys; reuse a key")
        job.kv[key] = value
        job.kv_signal.fire()

    # ------------------------------------------------------------------ metrics

    def count_members(self) -> int:
        return sum(len(r.members) for j in self.jobs.values() if (r := j.running()) is not None)

    def count_waiting(self) -> int:
        return sum(len(j.waiters) for j in self.jobs.values())
