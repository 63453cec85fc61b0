"""worker_command: the container command wrapped in `lattice run`, as the agent parses it."""

from __future__ import annotations

import pytest
from _operator_world import make_job

from lattice.agent.options import parse_run_args
from lattice.operator.core import nproc_per_node, worker_command, worker_env


def command(**spec: object) -> list[str]:
    return worker_command(
        make_job(**spec),
        rendezvous_endpoint="rdzv.lattice:29400",
        checkpoint_endpoint="ckpt.lattice:29500",
        job_id="lattice.demo",
    )


def test_wraps_the_user_command_in_lattice_run() -> None:
    assert command(minSize=2, maxSize=5) == [
        "lattice",
        "run",
        "--nnodes",
        "2:5",
        "--nproc-per-node",
        "1",
        "--rdzv-endpoint",
        "rdzv.lattice:29400",
        "--rdzv-id",
        "lattice.demo",
        "--max-restarts",
        "6",
        "--checkpoint-endpoint",
        "ckpt.lattice:29500",
        "--no-python",
        "python",
        "-u",
        "main.py",
    ]


def test_the_agent_accepts_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATTICE_TOKEN", "job-token")
    cmd = command(minSize=2, maxSize=5, nprocPerNode=3, runPolicy={"backoffLimit": 2})
    opts = parse_run_args(cmd[2:])
    assert (opts.min_nodes, opts.max_nodes, opts.nproc) == (2, 5, 3)
    assert opts.endpoint == "rdzv.lattice:29400" and opts.job == "lattice.demo"
    assert opts.checkpoint_endpoint == "ckpt.lattice:29500"
    assert opts.max_restarts == 2
    assert opts.no_python and opts.script == "python"
    assert opts.script_args == ("-u", "main.py")


def test_args_follow_the_command_and_no_checkpoint_endpoint_is_left_out() -> None:
    job = make_job()
    obj = job.to_dict()
    obj["spec"]["replicaSpecs"]["template"]["spec"]["containers"][0]["args"] = ["--lr", "0.1"]
    job = type(job).model_validate(obj)
    cmd = worker_command(
        job, rendezvous_endpoint="r:1", checkpoint_endpoint=None, job_id="lattice.demo"
    )
    assert "--checkpoint-endpoint" not in cmd
    assert cmd[-6:] == ["--no-python", "python", "-u", "main.py", "--lr", "0.1"]


def test_launcher_can_be_a_python_module() -> None:
    cmd = worker_command(
        make_job(),
        rendezvous_endpoint="r:1",
        checkpoint_endpoint=None,
        job_id="x",
        launcher=("/usr/bin/python3", "-m", "lattice"),
    )
    assert cmd[:4] == ["/usr/bin/python3", "-m", "lattice", "run"]


def test_inject_lattice_false_is_the_plain_command() -> None:
    assert command(injectLattice=False) == ["python", "-u", "main.py"]
    assert worker_env(make_job(injectLattice=False)) == {}


def test_nproc_defaults_to_the_gpu_limit() -> None:
    job = make_job()
    obj = job.to_dict()
    container = obj["spec"]["replicaSpecs"]["template"]["spec"]["containers"][0]
    container["resources"] = {"limits": {"nvidia.com/gpu": 4}}
    assert nproc_per_node(type(job).model_validate(obj)) == "4"
    assert nproc_per_node(job) == "1"
    assert nproc_per_node(make_job(nprocPerNode="auto")) == "auto"


def test_env_carries_the_checkpoint_policy() -> None:
    assert worker_env(make_job()) == {}
    assert worker_env(make_job(checkpoint={"every": "300s", "keep": 5})) == {
        "LATTICE_CHECKPOINT_EVERY": "300s",
        "LATTICE_CHECKPOINT_KEEP": "5",
    }
    assert worker_env(make_job(checkpoint={"enabled": False, "every": 10})) == {
        "LATTICE_AUTOPATCH": "none"
    }
