"""`lattice run` flag parsing: torchrun's spellings, PET_ variables, one-line errors."""

from __future__ import annotations

import pytest

from lattice.agent.options import parse_endpoint, parse_nnodes, parse_rdzv_conf, parse_run_args
from lattice.common.errors import UserError

ENDPOINT = ["--rdzv-endpoint", "127.0.0.1:29400", "--rdzv-id", "job-1", "--token", "t"]


@pytest.fixture(autouse=True)
def _no_pet(monkeypatch: pytest.MonkeyPatch, clean_env: dict[str, str]) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("PET_"):
            monkeypatch.delenv(key)


def test_torchrun_underscore_and_dash_spellings_agree() -> None:
    dash = parse_run_args(
        [*ENDPOINT, "--nnodes", "1:3", "--nproc-per-node", "2", "--max-restarts", "5", "t.py"]
    )
    under = parse_run_args(
        [
            "--rdzv_endpoint=127.0.0.1:29400",
            "--rdzv_id=job-1",
            "--token=t",
            "--nnodes=1:3",
            "--nproc_per_node=2",
            "--max_restarts=5",
            "t.py",
        ]
    )
    for opts in (dash, under):
        assert (opts.min_nodes, opts.max_nodes, opts.nproc, opts.max_restarts) == (1, 3, 2, 5)
        assert opts.endpoint == "127.0.0.1:29400" and opts.job == "job-1"


def test_script_args_are_left_alone_even_when_they_look_like_our_flags() -> None:
    opts = parse_run_args(["--nproc-per-node", "1", "train.py", "--nnodes", "9", "-m", "x"])
    assert opts.script == "train.py"
    assert opts.script_args == ("--nnodes", "9", "-m", "x")
    assert opts.max_nodes == 1


def test_module_mode_and_defaults() -> None:
    opts = parse_run_args(["-m", "pkg.train", "--lr", "1"])
    assert opts.module and opts.script == "pkg.train" and opts.script_args == ("--lr", "1")
    assert opts.standalone and opts.job.startswith("local-")
    assert opts.max_restarts == 3 and opts.tuning.safepoint_timeout_s == 30.0


def test_pet_environment_variables_give_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PET_NNODES", "2:4")
    monkeypatch.setenv("PET_RDZV_ENDPOINT", "10.1.2.3:5000")
    monkeypatch.setenv("PET_RDZV_ID", "kf-job")
    monkeypatch.setenv("LATTICE_TOKEN", "tok")
    opts = parse_run_args(["t.py"])
    assert (opts.min_nodes, opts.max_nodes, opts.endpoint, opts.job) == (
        2,
        4,
        "10.1.2.3:5000",
        "kf-job",
    )
    assert opts.token == "tok"
    assert parse_run_args(["--nnodes", "1", "t.py"]).max_nodes == 1  # flag beats PET_


def test_torchrun_only_flags_are_accepted_with_a_note() -> None:
    opts = parse_run_args(
        [
            "--rdzv-backend",
            "c10d",
            "--start-method",
            "fork",
            "--tee",
            "3",
            "--redirects",
            "3",
            "--role",
            "trainer",
            "--rdzv-conf",
            "is_host=1,settle=0.2,safepoint_timeout=5,join_timeout=9,foo=1",
            "--monitor-interval",
            "1",
            "--standalone",
            "t.py",
        ]
    )
    assert opts.role == "trainer"
    assert opts.tuning.settle_s == 0.2 and opts.tuning.safepoint_timeout_s == 5.0
    assert opts.tuning.join_timeout_s == 9.0
    joined = " | ".join(opts.notes)
    assert "c10d" in joined and "--start-method" in joined and "foo" in joined
    assert "--monitor-interval" in joined
    assert "is_host" not in joined


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--bogus", "t.py"], "unrecognized arguments: --bogus"),
        ([], "missing the training script"),
        (["--nnodes", "3:1", "t.py"], "MIN (3) is larger than MAX (1)"),
        (["--nnodes", "a:b", "t.py"], "use N or MIN:MAX"),
        (["--nnodes", "0", "t.py"], "at least 1"),
        (["--nproc-per-node", "lots", "t.py"], "--nproc-per-node"),
        (["--max-restarts", "-1", "t.py"], "--max-restarts"),
        (
            ["--rdzv-endpoint", "host:notaport", "--rdzv-id", "j", "--token", "t", "t.py"],
            "HOST:PORT",
        ),
        (["--rdzv-endpoint", "h:70000", "--rdzv-id", "j", "--token", "t", "t.py"], "1-65535"),
        (["--rdzv-endpoint", "h:1", "--token", "t", "t.py"], "--rdzv-id is required"),
        (["--rdzv-endpoint", "h:1", "--rdzv-id", "Bad ID", "--token", "t", "t.py"], "--rdzv-id"),
        (["--rdzv-endpoint", "h:1", "--rdzv-id", "j", "t.py"], "no token"),
        (["--nnodes", "2", "t.py"], "--rdzv-endpoint"),
        (["--rdzv-conf", "settle", "t.py"], "key=value"),
        (["--rdzv-conf", "settle=soon", "t.py"], "--rdzv-conf settle"),
        (["--rdzv-backend", "zookeeper", "t.py"], "--rdzv-backend"),
        (["-m", "--no-python", "x"], "cannot be combined"),
    ],
)
def test_mistakes_are_one_line_user_errors(argv: list[str], needle: str) -> None:
    with pytest.raises(UserError) as err:
        parse_run_args(argv)
    message = str(err.value)
    assert needle in message
    assert "\n" not in message


def test_endpoints_and_ranges() -> None:
    assert parse_endpoint("node-1", "--x", 29400) == "node-1:29400"
    assert parse_endpoint("[::1]:80", "--x", None) == "[::1]:80"
    assert parse_endpoint("http://h:5/", "--x", None) == "h:5"
    with pytest.raises(UserError):
        parse_endpoint("h", "--x", None)
    with pytest.raises(UserError):
        parse_endpoint("[zz]:1", "--x", None)
    assert parse_nnodes("4") == (4, 4)
    assert parse_nnodes("1:3") == (1, 3)
    tuning, notes = parse_rdzv_conf("last_call=0.5, prewarm=0, kill_grace=1")
    assert (tuning.settle_s, tuning.prewarm, tuning.kill_grace_s, notes) == (0.5, False, 1.0, [])


def test_nproc_cpu_and_shutdown_timeout() -> None:
    import os

    opts = parse_run_args(["--nproc-per-node", "cpu", "--shutdown-timeout", "7", "t.py"])
    assert opts.nproc == len(os.sched_getaffinity(0))
    assert opts.tuning.kill_grace_s == 7.0
