"""Peer replicas of a sharded model's pieces, for jobs without a checkpoint service.

Each rank of a sharded (FSDP) model writes only its own pieces to its node's tier, so a node
lost for good takes its ranks' pieces with it, and without a service no step is whole again.
Here each rank also sends its piece file to the rank with the same local rank on the next node
(``rank + local_world``), which stores it beside its own: every piece is then on two nodes, and
the restore (`Runtime._local_pieces`, which reads an old rank's file wherever a node has it)
needs nothing more. A single node has nothing to replicate to; with a service, the service
holds every piece.

The exchange runs on the writer thread, after the node-local write, over a gloo group of its
own (created on the training thread at the first sharded snapshot, which every rank reaches at
the same step): training never waits for it, and it never interleaves with the script's
collectives. Every rank takes the same snapshots in the same order, so exchange ``k`` is the
same step everywhere; a rank whose write failed still takes part, sending nothing.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from lattice.addon import local_tier

SUMMARY_BYTES = 256  # a `local_tier.digest` summary ("<size> <scheme>:<hex>"), padded
TIMEOUT_S = 600.0  # a peer that died: its round ends and the agent stops this process first


def wanted(world: int, local_world: int, has_service: bool) -> bool:
    """Whether pieces are replicated: several whole nodes, and no service holding them."""
    return not has_service and 0 < local_world < world and world % local_world == 0


class Ring:
    """Sends this rank's piece file to the next node, receives the previous node's."""

    def __init__(self, dist: Any, rank: int, world: int, local_world: int) -> None:
        self.dist = dist
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=TIMEOUT_S))
        self.to = (rank + local_world) % world
        self.source = (rank - local_world) % world

    def exchange(self, mine: Path | None) -> tuple[Any, str] | None:
        """Send ``mine`` (a verified piece file; None: this rank has none to give), and the
        bytes and checksum summary the previous node's rank sent (None when it had none)."""
        data, summary = b"", ""
        if mine is not None:
            summary = local_tier.recorded(mine) or ""
            data = mine.read_bytes() if summary else b""
        header = torch.zeros(1 + SUMMARY_BYTES, dtype=torch.int64)
        header[0] = len(data) if summary else -1
        text = summary.encode()[:SUMMARY_BYTES]
        header[1 : 1 + len(text)] = torch.tensor(list(text), dtype=torch.int64)
        theirs = torch.empty_like(header)
        self._both(header, theirs)
        size = int(theirs[0])
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else None
        received = torch.empty(max(size, 0), dtype=torch.uint8)
        self._both(payload, received if size > 0 else None)
        if size < 0:
            return None
        codes = bytes(int(c) for c in theirs[1:] if int(c))
        return received.numpy(), codes.decode()

    def _both(self, out: torch.Tensor | None, into: torch.Tensor | None) -> None:
        """Send ``out`` to the next node and receive ``into`` from the previous, together
        (a ring of blocking sends would deadlock)."""
        works = []
        if out is not None and out.numel():
            works.append(self.dist.isend(out, self.to, group=self.group))
        if into is not None and into.numel():
            works.append(self.dist.irecv(into, self.source, group=self.group))
        for work in works:
            work.wait()
