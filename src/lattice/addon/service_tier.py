"""Service tier: the checkpoint service, for restores where the node-local tier has nothing
newer (a new node, a lost /dev/shm).

Global rank 0 uploads ``state`` (the replicated state) and ``rng`` (every rank's RNG states,
gathered at the snapshot); with a sharded model every rank also uploads its pieces
(``shard-<rank>-of-<world>``). Rank 0 commits once all are there; a checkpoint is visible only
after the commit. Uploads run on the upload thread; restores on the training thread.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lattice.addon import protocol, sharded, state


class ServiceTier:
    def __init__(self, endpoint: str, job: str, token: str) -> None:
        from lattice.checkpoint.client import CheckpointClient

        self.client = CheckpointClient(endpoint, job, token)
        # A service on this machine (`lattice up`, a pod on this node's host network) hashes
        # and stores on the cores training uses: its uploads cost their whole time, not only
        # this process's CPU (see runtime).
        self.colocated = _on_this_machine(endpoint)
        keep = os.environ.get("LATTICE_CHECKPOINT_KEEP")
        self.keep = int(keep) if keep and keep.isdigit() else None

    @classmethod
    def from_env(cls) -> ServiceTier | None:
        endpoint = os.environ.get(protocol.ENV_ENDPOINT)
        if not endpoint:
            return None
        try:
            token = os.environ.get(protocol.ENV_TOKEN, "")
            return cls(endpoint, os.environ[protocol.ENV_JOB], token)
        except ImportError:  # lattice.checkpoint not installed: node-local tier only
            return None

    def put(
        self, step: int, folder: Path, names: list[str], rngs: list[Any] | None
    ) -> dict[str, Any]:
        """Upload files of a step folder (as ``torch.save`` wrote them) and, from rank 0,
        every rank's RNG states; their shard infos, for the commit."""
        shards = {
            name: self.client.put_shard(step, name, (folder / f"{name}.pt").read_bytes())
            for name in names
        }
        if rngs is not None:
            shards["rng"] = self.client.put_shard(step, "rng", state.dumps({"ranks": rngs}))
        return shards

    def commit(self, step: int, shards: dict[str, Any], world: int, generation: int) -> None:
        """Make ``step`` visible; ``generation`` is the rendezvous round that took it."""
        self.client.commit(step, shards, {"world": world, "round": generation}, keep=self.keep)

    def fence(self, generation: int) -> None:
        """Tell the service round ``generation`` has started (before it restores): a node of
        an ended round can no longer commit and change what this round restores."""
        self.client.fence(generation)

    def latest(self) -> tuple[int, int] | None:
        """(round, step) of the newest good checkpoint (round 0 when it has none)."""
        manifest = self.client.latest_good()
        if manifest is None:
            return None
        generation = manifest.meta.get("round", 0)
        return (generation if isinstance(generation, int) else 0), manifest.step

    def steps(self) -> list[int]:
        """Committed steps, newest first."""
        return [manifest.step for manifest in self.client.list()]

    def fetch(self, step: int, rank: int, world: int) -> dict[str, Any]:
        """Checkpoint ``step``: its replicated state, this rank's RNG, and the pieces of the
        old ranks this rank holds for a sharded model (old rank ``j`` is held by ``j % world``).

        Raises when anything is missing or fails its checksum (the caller takes the previous
        step).
        """
        from lattice.checkpoint.errors import CorruptCheckpoint

        manifest = next((m for m in self.client.list() if m.step == step), None)
        if manifest is None:
            raise CorruptCheckpoint(f"checkpoint of step {step} is gone from the service")
        old = sorted(p for p in map(sharded.parse_shard_name, manifest.shards) if p is not None)
        held = {
            j: state.loads(self.client.get_shard(step, sharded.shard_name(j, total)))
            for j, total in old
            if j % world == rank
        }
        rngs = state.loads(self.client.get_shard(step, "rng"))["ranks"]
        return {
            "state": state.loads(self.client.get_shard(step, "state")),
            "rng": rngs[rank] if rank < len(rngs) else None,
            "pieces": (held, {j: j % world for j, _total in old}),
        }


def _on_this_machine(endpoint: str) -> bool:
    """Whether ``host:port`` (or a URL) names this machine: loopback, this host's name, or an
    address of one of its interfaces (one it can bind). No name is looked up in DNS (that can
    block for seconds where there is none); a service reached by another name counts as
    remote."""
    import ipaddress
    import socket
    from urllib.parse import urlsplit

    host = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}").hostname or ""
    if host == "localhost" or host == socket.gethostname().lower():
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if address.is_loopback:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(address), 0))  # only an address of this machine can be bound
        return True
    except OSError:
        return False
