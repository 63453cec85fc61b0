"""The environment a training process gets (docs/architecture.md §3 and §8).

Split in two so a standby interpreter can be started before a round exists: `node_env` holds
what stays fixed for this agent and local rank (it may be read when torch is imported);
`round_env` adds what one round decides (ranks, sizes, master address, generation).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lattice.common.auth import job_token
from lattice.common.node_local import tier_root

# Variables the agent sets per round: never inherited from the agent's own environment.
ROUND_VARS = (
    "RANK",
    "WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT",
    "LATTICE_ROUND",
    "LATTICE_CONTROL_FILE",
)
# The agent's own credentials and settings: replaced (job token) or dropped, never inherited.
_AGENT_ONLY = frozenset({"LATTICE_TOKEN", "LATTICE_CHECKPOINT_ENDPOINT", "LATTICE_NODE_ID"})
JOB_TOKEN_PREFIX = "ljt1."


@dataclass(frozen=True)
class NodeSetup:
    """What the agent knows before any round: the job, this node, how to reach services."""

    job: str
    node_id: str
    nproc: int
    role: str
    max_restarts: int
    token: str | None  # admin or job token the agent holds
    checkpoint_endpoint: str | None
    bootstrap: Path | None  # addon bootstrap dir; None → not installed or turned off


@dataclass(frozen=True)
class RoundPlacement:
    """Where this node sits in one round."""

    generation: int
    group_rank: int
    group_world_size: int
    rank_offset: int  # global rank of this node's local rank 0
    world_size: int
    master_addr: str
    master_port: int
    restart_count: int
    control_file: str


def worker_token(token: str | None, job: str) -> str | None:
    """The token a worker may hold: a job token, derived here when the agent holds the admin."""
    if token is None:
        return None
    if token.startswith(JOB_TOKEN_PREFIX):
        return token
    return job_token(token, job)


def local_job_dir(job: str) -> Path:
    """One job's node-local checkpoints, every node of it on this machine."""
    return tier_root() / job


def local_ckpt_dir(job: str, node_id: str) -> Path:
    """Node-local checkpoint tier of one node of a job."""
    return local_job_dir(job) / node_id


def autopatch_setting(base: Mapping[str, str]) -> str:
    return base.get("LATTICE_AUTOPATCH", "").strip() or "torch,transformers"


def addon_active(base: Mapping[str, str], bootstrap: Path | None) -> bool:
    """Whether workers will run the addon (so they can honour a safe-point request)."""
    return bootstrap is not None and autopatch_setting(base).lower() != "none"


def node_env(base: Mapping[str, str], setup: NodeSetup, local_rank: int) -> dict[str, str]:
    """Environment fixed for this agent and local rank, whatever the round."""
    env = {k: v for k, v in base.items() if k not in ROUND_VARS and k not in _AGENT_ONLY}
    env.update(
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(setup.nproc),
        ROLE_NAME=setup.role,
        TORCHELASTIC_RUN_ID=setup.job,
        TORCHELASTIC_MAX_RESTARTS=str(setup.max_restarts),
        TORCHELASTIC_USE_AGENT_STORE="False",  # rank 0 hosts the store at MASTER_PORT
        LATTICE_JOB=setup.job,
        LATTICE_LOCAL_CKPT_DIR=str(local_ckpt_dir(setup.job, setup.node_id)),
        LATTICE_AUTOPATCH=autopatch_setting(base),
    )
    token = worker_token(setup.token, setup.job)
    if token is not None:
        env["LATTICE_TOKEN"] = token
    if setup.checkpoint_endpoint:
        env["LATTICE_CHECKPOINT_ENDPOINT"] = setup.checkpoint_endpoint
    # Workers abort on their own when a collective fails instead of hanging on a dead peer.
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    if setup.nproc > 1:
        env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: don't oversubscribe cores
    if setup.bootstrap is not None and addon_active(base, setup.bootstrap):
        env["PYTHONPATH"] = with_bootstrap(base.get("PYTHONPATH", ""), setup.bootstrap)
    return env


def with_bootstrap(pythonpath: str, bootstrap: Path) -> str:
    parts = [p for p in pythonpath.split(os.pathsep) if p and p != str(bootstrap)]
    return os.pathsep.join([str(bootstrap), *parts])


def round_env(node: Mapping[str, str], place: RoundPlacement) -> dict[str, str]:
    """The full environment of one worker in one round."""
    local_rank = int(node["LOCAL_RANK"])
    rank = place.rank_offset + local_rank
    env = dict(node)
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(place.world_size),
        GROUP_RANK=str(place.group_rank),
        GROUP_WORLD_SIZE=str(place.group_world_size),
        ROLE_RANK=str(rank),
        ROLE_WORLD_SIZE=str(place.world_size),
        MASTER_ADDR=place.master_addr,
        MASTER_PORT=str(place.master_port),
        TORCHELASTIC_RESTART_COUNT=str(place.restart_count),
        LATTICE_ROUND=str(place.generation),
        LATTICE_CONTROL_FILE=place.control_file,
    )
    return env
