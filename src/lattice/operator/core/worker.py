"""The command and environment of a worker: the user's container command wrapped in
``lattice run`` (the agent), unless the job opted out with ``injectLattice: false``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lattice.api.job import TrainingJob


@dataclass(frozen=True)
class Services:
    """Where a job's workers reach the Lattice services, and how to start the agent.

    ``launcher`` is the agent's executable: ``lattice`` in images, or e.g.
    ``(sys.executable, "-m", "lattice")`` for local processes.
    """

    rendezvous_endpoint: str
    checkpoint_endpoint: str | None = None
    launcher: tuple[str, ...] = ("lattice",)


def nproc_per_node(job: TrainingJob) -> str:
    """``--nproc-per-node``: the spec's value, else the training container's GPU count, else 1."""
    value = job.spec.nproc_per_node
    if value is not None:
        return str(value)
    gpus = job.training_container.resources.amount("nvidia.com/gpu")
    return str(int(gpus)) if gpus and gpus >= 1 else "1"


def user_command(job: TrainingJob) -> list[str]:
    """The training container's command followed by its args."""
    container = job.training_container
    return [*container.command, *container.args]


def worker_command(
    job: TrainingJob,
    *,
    rendezvous_endpoint: str,
    checkpoint_endpoint: str | None,
    job_id: str,
    launcher: Sequence[str] = ("lattice",),
) -> list[str]:
    """The worker's full command line.

    ``lattice run --nnodes MIN:MAX --nproc-per-node N --rdzv-endpoint E --rdzv-id ID
    --max-restarts B [--checkpoint-endpoint C] --no-python <command> <args>``; with
    ``injectLattice: false`` the user's command as it is.
    """
    command = user_command(job)
    if not job.spec.inject_lattice:
        return command
    out = [
        *launcher,
        "run",
        "--nnodes",
        f"{job.spec.min_size}:{job.spec.max_size}",
        "--nproc-per-node",
        nproc_per_node(job),
        "--rdzv-endpoint",
        rendezvous_endpoint,
        "--rdzv-id",
        job_id,
        "--max-restarts",
        str(job.spec.run_policy.backoff_limit),
    ]
    if checkpoint_endpoint:
        out += ["--checkpoint-endpoint", checkpoint_endpoint]
    return [*out, "--no-python", *command]


def worker_env(job: TrainingJob) -> dict[str, str]:
    """Lattice settings for the agent and addon from the spec (nothing secret).

    ``LATTICE_AUTOPATCH=none`` turns the addon off for ``framework: generic`` or
    ``checkpoint.enabled: false``; ``LATTICE_CHECKPOINT_EVERY`` ("N" steps or "Ns" seconds) and
    ``LATTICE_CHECKPOINT_KEEP`` carry the checkpoint policy.
    """
    if not job.spec.inject_lattice:
        return {}
    env: dict[str, str] = {}
    policy = job.spec.checkpoint
    if job.spec.framework == "generic" or not policy.enabled:
        env["LATTICE_AUTOPATCH"] = "none"
    if policy.enabled and policy.every:
        env["LATTICE_CHECKPOINT_EVERY"] = policy.every
    if policy.enabled and policy.keep:
        env["LATTICE_CHECKPOINT_KEEP"] = str(policy.keep)
    return env
