"""Async clients of the rendezvous service: one per agent (`RendezvousClient`) and one for
the operator (`AdminClient`).

The agent joins, gets a `Round`, runs it, and waits for its `RoundEnd` (pushed by long-poll).
The client heart-beats in the background and, if the service restarts, re-registers the round
it is in, so a restart never ends a running round.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from lattice.common.http import valid_job_id
from lattice.rendezvous.errors import RendezvousError, RendezvousTimeout
from lattice.rendezvous.models import NODE_ID_RE
from lattice.rendezvous.transport import Transport, error_code

log = logging.getLogger("lattice.rendezvous.client")

JOIN_HOLD_S = 30.0  # longest single join long-poll (the service answers after lease/2 anyway)
END_HOLD_S = 30.0  # longest single round-end long-poll
KV_HOLD_S = 30.0
DEFAULT_LEASE_S = 3.0


@dataclass(frozen=True)
class Member:
    node_id: str
    rank: int
    nproc: int
    addr: str
    port: int


@dataclass(frozen=True)
class Round:
    """An immutable membership: who is in, with which ranks, under which generation."""

    job: str
    generation: int
    members: tuple[Member, ...]  # sorted by rank

    @property
    def world_size(self) -> int:
        return sum(m.nproc for m in self.members)

    @property
    def master_addr(self) -> str:
        return self.members[0].addr

    @property
    def master_port(self) -> int:
        return self.members[0].port

    def member(self, node_id: str) -> Member:
        for m in self.members:
            if m.node_id == node_id:
                return m
        raise KeyError(f"node {node_id!r} is not a member of round {self.generation}")

    def rank_offset(self, node_id: str) -> int:
        """Global rank of ``node_id``'s local rank 0."""
        rank = self.member(node_id).rank
        return sum(m.nproc for m in self.members if m.rank < rank)


@dataclass(frozen=True)
class RoundEnd:
    generation: int
    reason: str  # failure | node_lost | left | resize (| succeeded: every member succeeded)
    detail: str
    graceful: bool  # True only for resize: stop at a safe point


def _round(data: dict[str, Any]) -> Round:
    members = tuple(
        sorted(
            (
                Member(m["node_id"], int(m["rank"]), int(m["nproc"]), m["addr"], int(m["port"]))
                for m in data["members"]
            ),
            key=lambda m: m.rank,
        )
    )
    return Round(data["job"], int(data["generation"]), members)


_DECODED: OrderedDict[bytes, tuple[Round, float]] = OrderedDict()
_DECODED_MAX = 4


def _ready_answer(content: bytes) -> tuple[Round, float] | None:
    """The round and lease of a join answer, or None while still waiting.

    Every member gets the same bytes, and clients in one process (the scale benchmark runs a
    thousand) decode them once instead of each building the same N members again.
    """
    hit = _DECODED.get(content)
    if hit is not None:
        return hit
    data = json.loads(content)
    if data.get("status") != "ready":
        return None
    answer = (_round(data["round"]), float(data["lease_s"]))
    _DECODED[content] = answer
    while len(_DECODED) > _DECODED_MAX:
        _DECODED.popitem(last=False)
    return answer


def _end(data: dict[str, Any]) -> RoundEnd:
    return RoundEnd(
        int(data["generation"]), data["reason"], data.get("detail", ""), bool(data["graceful"])
    )


@dataclass(frozen=True)
class _Spec:
    nproc: int
    addr: str
    port: int
    min_nodes: int
    max_nodes: int


class RendezvousClient:
    """One node of one job."""

    def __init__(
        self,
        endpoint: str,
        job: str,
        node_id: str,
        token: str | None,
        *,
        request_timeout: float = 10.0,
        unreachable_after: float = 60.0,
    ) -> None:
        if not valid_job_id(job):
            raise RendezvousError(
                f"invalid job id {job!r}: use lowercase letters, digits, '-', '_', '.'"
            )
        if not NODE_ID_RE.match(node_id):
            raise RendezvousError(
                f"invalid node id {node_id!r}: use 1-128 letters, digits, '.', '_', ':', '-' "
                "(starting and ending with a letter or digit)"
            )
        self.job = job
        self.node_id = node_id
        self._t = Transport(
            endpoint, token, request_timeout=request_timeout, unreachable_after=unreachable_after
        )
        self._base = f"/v1/jobs/{job}"
        self._lease_s = DEFAULT_LEASE_S
        self._spec: _Spec | None = None
        self._round: Round | None = None  # the round this node is in, until it ends
        self._highest: int | None = None  # newest generation seen: re-asserted after restarts
        self._join_polls = 0  # a join poll in flight already proves liveness
        self._seen_at = 0.0  # loop time the service last heard from this node (for heartbeats)
        self._heartbeat: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ rounds

    async def join(
        self,
        *,
        nproc: int,
        addr: str,
        port: int,
        min_nodes: int,
        max_nodes: int,
        timeout: float | None = None,
    ) -> Round:
        """Wait for a round that includes this node; RendezvousTimeout after ``timeout`` s."""
        self._spec = _Spec(nproc, addr, port, min_nodes, max_nodes)
        self._round = None
        self._start_heartbeats()
        join_id = uuid.uuid4().hex
        body: dict[str, Any] = {
            "node_id": self.node_id,
            "join_id": join_id,
            "nproc": nproc,
            "addr": addr,
            "port": port,
            "min_nodes": min_nodes,
            "max_nodes": max_nodes,
            "last_generation": self._highest,
        }
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        self._join_polls += 1
        try:
            while True:
                left = JOIN_HOLD_S if deadline is None else deadline - loop.time()
                if left <= 0:
                    await self._withdraw(join_id)
                    raise RendezvousTimeout(
                        f"no round of job {self.job} formed within {timeout:g} s "
                        f"(fewer than {min_nodes} node(s) joined)"
                    )
                hold = min(left, JOIN_HOLD_S)
                response = await self._t.call(
                    "POST", f"{self._base}/join", json={**body, "wait_s": hold}, hold=hold
                )
                ready = _ready_answer(response.content)
                if ready is None:  # still waiting: remember the job's generation, so that
                    data = response.json()  # after a restart the service knows it had rounds
                    self._learn_lease(data)
                    current = data.get("generation")
                    if isinstance(current, int):
                        self._highest = max(self._highest or 0, current)
                        body["last_generation"] = self._highest
                else:
                    rnd, lease = ready
                    self._learn_lease({"lease_s": lease})
                    self._seen_at = loop.time()
                    self._round = rnd
                    self._highest = max(self._highest or 0, rnd.generation)
                    return rnd
        except asyncio.CancelledError:
            task = asyncio.ensure_future(self._withdraw(join_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            raise
        finally:
            self._join_polls -= 1

    async def _withdraw(self, join_id: str) -> None:
        with contextlib.suppress(Exception):
            await self._t.call(
                "POST",
                f"{self._base}/withdraw",
                json={"node_id": self.node_id, "join_id": join_id},
                retry=False,
            )

    async def wait_round_end(self, generation: int) -> RoundEnd:
        """The end of round ``generation``, pushed the moment the service ends it.

        A service restart does not end it: the client re-registers the round and keeps waiting.
        """
        while True:
            response = await self._t.call(
                "GET",
                f"{self._base}/rounds/{generation}/end",
                params={"node_id": self.node_id, "wait_s": END_HOLD_S},
                hold=END_HOLD_S,
            )
            if response.status_code == 404:
                end = await self._reassert_or_end(generation)
                if end is not None:
                    return self._ended(end)
                continue
            data = response.json()
            if data.get("ended"):
                return self._ended(_end(data["end"]))

    def _ended(self, end: RoundEnd) -> RoundEnd:
        if self._round is not None and self._round.generation == end.generation:
            self._round = None
        return end

    async def _reassert_or_end(self, generation: int) -> RoundEnd | None:
        """The service does not know round ``generation``: re-register it if it is ours."""
        rnd = self._round
        if rnd is None or rnd.generation != generation:
            return RoundEnd(
                generation,
                "node_lost",
                f"round {generation} is unknown to the service (it restarted without it)",
                False,
            )
        return await self._reassert(rnd)

    async def _reassert(self, rnd: Round) -> RoundEnd | None:
        """Re-register ``rnd`` with a restarted service; its end if it already ended."""
        spec = self._spec
        assert spec is not None
        body = {
            "node_id": self.node_id,
            "generation": rnd.generation,
            "min_nodes": spec.min_nodes,
            "max_nodes": spec.max_nodes,
            "members": [
                {
                    "node_id": m.node_id,
                    "rank": m.rank,
                    "nproc": m.nproc,
                    "addr": m.addr,
                    "port": m.port,
                }
                for m in rnd.members
            ],
        }
        response = await self._t.call("POST", f"{self._base}/register", json=body)
        data = response.json()
        self._learn_lease(data)
        if data.get("status") == "ended":
            return _end(data["end"])
        log.info("re-registered round %d of job %s with the service", rnd.generation, self.job)
        return None

    async def report_failure(self, generation: int, detail: str) -> None:
        """Tell the service this node's workers failed: it ends the round for every member."""
        await self._report(
            generation, "failure", {"node_id": self.node_id, "detail": detail[:4096]}
        )

    async def report_succeeded(self, generation: int) -> None:
        """This node's workers all exited 0 (the others' round goes on)."""
        await self._report(generation, "succeeded", {"node_id": self.node_id})

    async def _report(self, generation: int, what: str, body: dict[str, Any]) -> None:
        path = f"{self._base}/rounds/{generation}/{what}"
        response = await self._t.call("POST", path, json=body)
        if response.status_code == 404 and error_code(response) == "unknown_round":
            rnd = self._round
            if rnd is not None and rnd.generation == generation:
                await self._reassert(rnd)
                await self._t.call("POST", path, json=body)

    async def leave(self) -> None:
        """Leave the job: a running round this node is in ends for the others ("left")."""
        await self._stop_heartbeats()
        self._round = None
        await self._t.call("POST", f"{self._base}/leave", json={"node_id": self.node_id})

    async def job_status(self) -> dict[str, Any]:
        """This job's state at the service (generation, members, waiting nodes).

        Also a cheap check that the service is reachable and accepts the token.
        """
        response = await self._t.call("GET", self._base)
        return dict(response.json())

    # ------------------------------------------------------------------ KV

    async def kv_set(self, key: str, value: bytes | str) -> None:
        data = value.encode() if isinstance(value, str) else value
        await self._t.call("PUT", f"{self._base}/kv/{quote(key, safe='/')}", content=data)

    async def kv_get(self, key: str, wait_s: float | None = None) -> bytes | None:
        """The value of ``key``; waits up to ``wait_s`` seconds for it to be set."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (wait_s or 0.0)
        while True:
            hold = max(0.0, min(deadline - loop.time(), KV_HOLD_S))
            response = await self._t.call(
                "GET",
                f"{self._base}/kv/{quote(key, safe='/')}",
                params={"wait_s": round(hold, 3)},
                hold=hold,
            )
            if response.status_code != 404:
                return response.content
            if loop.time() >= deadline:
                return None

    # ------------------------------------------------------------------ liveness

    def _learn_lease(self, data: dict[str, Any]) -> None:
        lease = data.get("lease_s")
        if isinstance(lease, int | float) and lease > 0:
            self._lease_s = float(lease)
            self._t.backoff_max = min(0.5, self._lease_s / 4)

    def _start_heartbeats(self) -> None:
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._heartbeats(), name="rdzv-heartbeat")

    async def _stop_heartbeats(self) -> None:
        task, self._heartbeat = self._heartbeat, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _heartbeats(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = self._seen_at + self._lease_s / 4
            if loop.time() < due:
                await asyncio.sleep(due - loop.time())
                continue
            self._seen_at = loop.time()  # the next beat is due one interval after this one
            if self._join_polls:
                continue
            rnd = self._round
            body = {"node_id": self.node_id, "generation": rnd.generation if rnd else None}
            try:
                response = await self._t.call(
                    "POST", f"{self._base}/heartbeat", json=body, retry=False
                )
                if response.status_code == 404 and rnd is not None and rnd is self._round:
                    await self._reassert(rnd)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next beat tries again; the lease allows several
                log.debug("heartbeat failed: %s", exc)

    async def close(self) -> None:
        """Stop heart-beating and release the connection (does not leave the job)."""
        await self._stop_heartbeats()
        if self._background:
            await asyncio.wait(self._background, timeout=self._t.request_timeout)
        await self._t.close()

    async def __aenter__(self) -> RendezvousClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()


class AdminClient:
    """The operator's view of the service (admin token): target sizes and job status."""

    def __init__(self, endpoint: str, token: str) -> None:
        self._t = Transport(endpoint, token, request_timeout=10.0, unreachable_after=30.0)

    async def set_target(self, job: str, size: int | None) -> None:
        """Rounds of ``job`` close as soon as ``size`` nodes wait (None: back to settle)."""
        await self._t.call("PUT", f"/v1/jobs/{job}/target", json={"size": size})

    async def job_status(self, job: str) -> dict[str, Any]:
        """Current generation, members, waiting nodes, target, sizes."""
        response = await self._t.call("GET", f"/v1/jobs/{job}")
        return dict(response.json())

    async def close(self) -> None:
        await self._t.close()

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()
