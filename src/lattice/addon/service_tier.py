"""Service tier: the checkpoint service, for restores where the node-local tier has nothing
newer (a new node, a lost /dev/shm).

Global rank 0 uploads two shards per checkpoint, ``state`` (the replicated state) and ``rng``
(every rank's RNG states, gathered at the snapshot), then commits them; a checkpoint is visible
only after the commit. Everything here runs on the writer thread except `latest`.
"""

from __future__ import annotations

import os
from typing import Any

from lattice.addon import protocol, state


class ServiceTier:
    def __init__(self, endpoint: str, job: str, token: str) -> None:
        from lattice.checkpoint.client import CheckpointClient

        self.client = CheckpointClient(endpoint, job, token)
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

    def upload(self, step: int, replicated: bytes, rngs: list[Any], generation: int) -> None:
        """Upload one checkpoint: ``replicated`` is the state as ``torch.save`` wrote it;
        ``generation`` the rendezvous round that took it."""
        shards = {
            "state": self.client.put_shard(step, "state", replicated),
            "rng": self.client.put_shard(step, "rng", state.dumps({"ranks": rngs})),
        }
        self.client.commit(step, shards, {"world": len(rngs), "round": generation}, keep=self.keep)

    def latest(self) -> tuple[int, int] | None:
        """(round, step) of the newest good checkpoint (round 0 when it has none)."""
        manifest = self.client.latest_good()
        if manifest is None:
            return None
        generation = manifest.meta.get("round", 0)
        return (generation if isinstance(generation, int) else 0), manifest.step

    def download(self, rank: int) -> tuple[int, dict[str, Any], Any] | None:
        """(step, replicated state, this rank's RNG or None) of the newest good checkpoint."""
        got = self.client.read_latest_good(["state", "rng"])
        if got is None:
            return None
        manifest, shards = got
        rngs = state.loads(shards["rng"])["ranks"]
        rng = rngs[rank] if rank < len(rngs) else None
        return manifest.step, state.loads(shards["state"]), rng
