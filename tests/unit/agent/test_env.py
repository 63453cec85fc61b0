"""The worker environment: torch elastic variables, Lattice variables, no admin token leak."""

from __future__ import annotations

from pathlib import Path

import pytest

from lattice.agent.env import NodeSetup, RoundPlacement, node_env, round_env, worker_token
from lattice.common.auth import Authenticator, job_token


def _setup(token: str | None, bootstrap: Path | None = None) -> NodeSetup:
    return NodeSetup(
        job="job-a",
        node_id="node-1",
        nproc=2,
        role="trainer",
        max_restarts=3,
        token=token,
        checkpoint_endpoint="127.0.0.1:9000",
        bootstrap=bootstrap,
    )


PLACE = RoundPlacement(
    generation=7,
    group_rank=1,
    group_world_size=3,
    rank_offset=2,
    world_size=6,
    master_addr="127.0.0.1",
    master_port=4242,
    restart_count=2,
    control_file="/tmp/ctl",
)


def test_round_env_has_every_contract_variable(
    admin_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LATTICE_LOCAL_ROOT", raising=False)  # the tier's default place
    base = {"PATH": "/bin", "RANK": "99", "MASTER_PORT": "1", "LATTICE_TOKEN": admin_token}
    env = round_env(node_env(base, _setup(admin_token), local_rank=1), PLACE)
    expected = {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "6",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1",
        "GROUP_WORLD_SIZE": "3",
        "ROLE_RANK": "3",
        "ROLE_WORLD_SIZE": "6",
        "ROLE_NAME": "trainer",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "4242",
        "TORCHELASTIC_RESTART_COUNT": "2",
        "TORCHELASTIC_MAX_RESTARTS": "3",
        "TORCHELASTIC_RUN_ID": "job-a",
        "TORCHELASTIC_USE_AGENT_STORE": "False",
        "LATTICE_JOB": "job-a",
        "LATTICE_ROUND": "7",
        "LATTICE_CONTROL_FILE": "/tmp/ctl",
        "LATTICE_CHECKPOINT_ENDPOINT": "127.0.0.1:9000",
        "LATTICE_AUTOPATCH": "torch,transformers",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        "OMP_NUM_THREADS": "1",
        "PATH": "/bin",
    }
    assert {k: env.get(k) for k in expected} == expected
    assert env["LATTICE_LOCAL_CKPT_DIR"].endswith("/lattice/job-a/node-1")
    # Workers get a job token for their own job only, never the admin token.
    assert env["LATTICE_TOKEN"] != admin_token
    who = Authenticator(admin_token).identify(env["LATTICE_TOKEN"])
    assert who is not None and not who.admin and who.job == "job-a"


def test_job_token_passes_through_and_user_settings_survive(admin_token: str) -> None:
    token = job_token(admin_token, "job-a")
    assert worker_token(token, "job-a") == token
    base = {"OMP_NUM_THREADS": "4", "LATTICE_AUTOPATCH": "none", "LATTICE_ADDON_X": "1"}
    env = node_env(base, _setup(token), local_rank=0)
    assert env["LATTICE_TOKEN"] == token
    assert env["OMP_NUM_THREADS"] == "4"
    assert env["LATTICE_AUTOPATCH"] == "none"
    assert env["LATTICE_ADDON_X"] == "1"
    assert "RANK" not in env and "LATTICE_ROUND" not in env


def test_bootstrap_goes_first_on_pythonpath_once(tmp_path: Path) -> None:
    boot = tmp_path / "_bootstrap"
    base = {"PYTHONPATH": f"/a:{boot}:/b"}
    env = node_env(base, _setup(None, boot), local_rank=0)
    assert env["PYTHONPATH"] == f"{boot}:/a:/b"
    assert "LATTICE_TOKEN" not in env
    off = node_env({**base, "LATTICE_AUTOPATCH": "none"}, _setup(None, boot), local_rank=0)
    assert off["PYTHONPATH"] == base["PYTHONPATH"]
