"""The job-wide count of failed rounds, agreed between agents through the rendezvous KV.

``--max-restarts`` and ``TORCHELASTIC_RESTART_COUNT`` must mean the same on every node, also
for an agent that joined late or after the service restarted (its KV is soft state). Each agent
keeps one record, ``{"count", "last"}`` (failed rounds seen, generation of the newest), under
its own key, so no agent ever overwrites another's. At a round's start every member publishes
its record and adopts the highest count among the members; when a round ends in failure each
member counts it once: a record whose ``last`` is that generation already includes it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lattice.rendezvous.client import RendezvousClient, Round

log = logging.getLogger("lattice.agent")

KEY_PREFIX = "lattice.agent/failures/"
PEER_WAIT_S = 2.0  # at a round's start, how long to wait for a member's record to appear


@dataclass(frozen=True)
class Record:
    count: int
    last: int  # generation of the newest failed round counted (0: none)

    def after(self, generation: int) -> int:
        """This record's count once round ``generation``'s failure is included."""
        return self.count if self.last >= generation else self.count + 1


class FailureLedger:
    """This agent's view of the job's failure count."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.own = Record(0, 0)

    @property
    def count(self) -> int:
        return self.own.count

    async def agree(self, client: RendezvousClient, rnd: Round) -> int:
        """At the start of ``rnd``: publish ours, adopt the highest among the members."""
        await self._publish(client)
        peers = [m.node_id for m in rnd.members if m.node_id != self.node_id]
        for record in await self._read(client, peers, PEER_WAIT_S):
            if record.count > self.own.count:
                self.own = Record(record.count, max(record.last, self.own.last))
        return self.own.count

    async def count_failure(self, client: RendezvousClient, rnd: Round) -> int:
        """Round ``rnd`` ended in failure: count it once for the job; returns the new count."""
        gen = rnd.generation
        peers = [m.node_id for m in rnd.members if m.node_id != self.node_id]
        records = [self.own, *await self._read(client, peers, 0.0)]
        self.own = Record(max(r.after(gen) for r in records), gen)
        await self._publish(client)
        return self.own.count

    async def _publish(self, client: RendezvousClient) -> None:
        value = json.dumps({"count": self.own.count, "last": self.own.last})
        try:
            await client.kv_set(KEY_PREFIX + self.node_id, value)
        except Exception as exc:  # the count then stays local until the service answers
            log.debug("could not publish the failure count: %s", exc)

    async def _read(
        self, client: RendezvousClient, nodes: list[str], wait_s: float
    ) -> list[Record]:
        async def one(node: str) -> Record | None:
            try:
                raw = await client.kv_get(KEY_PREFIX + node, wait_s=wait_s or None)
                if not raw:
                    return None
                data = json.loads(raw)
                return Record(int(data["count"]), int(data["last"]))
            except Exception as exc:
                log.debug("could not read %s's failure count: %s", node, exc)
                return None

        found = await asyncio.gather(*(one(n) for n in nodes))
        return [r for r in found if r is not None]
