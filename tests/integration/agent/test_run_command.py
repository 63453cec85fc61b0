"""`lattice run` as a user runs it: standalone training, restart budget, hung workers, errors."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from _agent_cluster import LATTICE, TRAIN, alive, base_env, descendants, free_port, kill_tree


def run(
    args: list[str], cwd: Path, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(
        [*LATTICE, "run", *args],
        cwd=cwd,
        env={**base_env(), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate(timeout=30)
        tail = f"{out[-3000:]}{err[-3000:]}"
        raise AssertionError(f"lattice run {args} hung for {timeout} s:\n{tail}") from None
    finally:
        kill_tree(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_standalone_run_trains_and_exits_zero(tmp_path: Path) -> None:
    res = run(["--nproc-per-node", "2", str(TRAIN), "--steps", "3", "--step-time", "0"], tmp_path)
    assert res.returncode == 0, res.stderr
    done = re.findall(r"^\[rank(\d)\]: DONE rank=(\d) world=2 round=(\d+)", res.stdout, re.M)
    assert sorted((p, r) for p, r, _ in done) == [("0", "0"), ("1", "1")], res.stdout
    assert len({g for *_, g in done}) == 1
    assert "all local workers succeeded" in res.stderr


def test_max_restarts_exhausted_is_a_clean_failure(tmp_path: Path) -> None:
    (tmp_path / "fail.py").write_text(
        "import os, sys\nprint('round', os.environ['LATTICE_ROUND'],"
        " 'restart', os.environ['TORCHELASTIC_RESTART_COUNT'], flush=True)\nsys.exit(3)\n"
    )
    res = run(["--max-restarts", "2", "fail.py"], tmp_path)
    assert res.returncode == 1
    restarts = re.findall(r"^\[rank0\]: round (\d+) restart (\d+)$", res.stdout, re.M)
    assert [r for _, r in restarts] == ["0", "1", "2"], res.stdout
    assert len({g for g, _ in restarts}) == 3, "every attempt is a new round"
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("lattice: error: job ") and "--max-restarts 2" in last, res.stderr
    assert "exited with code 3" in last
    assert "Traceback" not in res.stderr


def test_hung_worker_is_killed_when_its_peer_fails(tmp_path: Path) -> None:
    """Rank 1 dies; rank 0 sits in a 'collective' forever and ignores SIGTERM."""
    (tmp_path / "hang.py").write_text(
        "import os, signal, sys, time\n"
        "if os.environ['LOCAL_RANK'] == '1':\n"
        "    time.sleep(0.5)\n"
        "    sys.exit(7)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('pid', os.getpid(), flush=True)\n"
        "time.sleep(3600)\n"
    )
    started = time.monotonic()
    res = run(
        ["--nproc-per-node", "2", "--max-restarts", "0", "--rdzv-conf", "kill_grace=1", "hang.py"],
        tmp_path,
    )
    assert res.returncode == 1, res.stderr
    assert time.monotonic() - started < 60
    pids = [int(p) for p in re.findall(r"^\[rank0\]: pid (\d+)$", res.stdout, re.M)]
    assert pids and not any(alive(p) for p in pids)
    assert "rank 1 (node" in res.stderr and "exited with code 7" in res.stderr


SAVER = """
import os, signal, torch, torch.distributed as dist
from torch import nn
dist.init_process_group("gloo")
torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(12)])  # 600 MB with Adam's state
net = nn.parallel.DistributedDataParallel(model)
opt = torch.optim.Adam(model.parameters(), lr=1e-4)
first = os.environ["TORCHELASTIC_RESTART_COUNT"] == "0"
step = 0
while step < 8:
    net(torch.randn(4, 2048)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    step += 1
    if first and step == 5 and dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
print("done", step, flush=True)
"""


def test_a_survivor_saving_its_last_step_outlives_the_kill_grace(tmp_path: Path) -> None:
    """Rank 1 is killed -9 after step 5; rank 0 saves step 5 (the failed-step save: a 300 MB
    state takes longer than the 1 s kill grace here) while the agent stops it. It marks
    itself saving, so the agent waits, and the restart restores step 5."""
    (tmp_path / "saver.py").write_text(SAVER)
    job = f"saver-{time.monotonic_ns()}"
    res = run(
        [
            *("--nproc-per-node", "2", "--max-restarts", "1", "--rdzv-id", job),
            *("--rdzv-conf", "kill_grace=1", "saver.py"),
        ],
        tmp_path,
        timeout=300,
        LATTICE_AUTOPATCH="torch",
        LATTICE_CHECKPOINT_EVERY="1000",  # no periodic checkpoint after the first ones
    )
    try:
        assert res.returncode == 0, res.stderr[-3000:]
        assert "the round failed after step 5: saved it" in res.stderr, res.stderr[-3000:]
        assert "restored step 5 " in res.stderr, res.stderr[-3000:]
        done = re.findall(r"^\[rank(\d)\]: done (\d+)$", res.stdout, re.M)
        assert sorted(done) == [("0", "8"), ("1", "8")], res.stdout[-3000:]
    finally:
        from lattice.agent.env import local_job_dir

        shutil.rmtree(local_job_dir(job), ignore_errors=True)


def test_sigint_stops_a_standalone_run(tmp_path: Path) -> None:
    (tmp_path / "loop.py").write_text(
        "import time\nprint('up', flush=True)\nwhile True:\n    time.sleep(0.05)\n"
    )
    proc = subprocess.Popen(
        [*LATTICE, "run", "--nproc-per-node", "2", "loop.py"],
        cwd=tmp_path,
        env=base_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().endswith(": up\n")
        tree = descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 128 + signal.SIGINT
        assert not any(alive(p) for p in tree)
    finally:
        kill_tree(proc.pid)


def _closed_port() -> int:
    port = free_port()
    with socket.socket() as s:  # nothing listens there
        s.bind(("127.0.0.1", port))
    return port


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--bogus", "x.py"], "unrecognized arguments: --bogus"),
        (["missing.py"], "training script 'missing.py' not found"),
        (["--nnodes", "3:2", "x.py"], "MIN (3) is larger than MAX (2)"),
        (
            ["--rdzv-endpoint", "127.0.0.1:99999", "--rdzv-id", "j", "--token", "t", "x.py"],
            "--rdzv-endpoint",
        ),
        (
            [
                "--rdzv-endpoint",
                "127.0.0.1:{closed}",
                "--rdzv-id",
                "j",
                "--token",
                "t",
                "--rdzv-conf",
                "unreachable_after=1",
                "x.py",
            ],
            "is not reachable",
        ),
    ],
)
def test_user_errors_are_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    (tmp_path / "x.py").write_text("print('never runs')\n")
    args = [a.replace("{closed}", str(_closed_port())) for a in args]
    res = run(args, tmp_path, timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lattice: error: "), res.stderr
    assert needle in lines[0]
    assert "never runs" not in res.stdout


def test_bad_token_is_one_line(tmp_path: Path) -> None:
    from lattice.common.auth import new_admin_token
    from lattice.common.http import BackgroundService
    from lattice.rendezvous.server import create_app

    token = new_admin_token()
    service = BackgroundService(lambda: create_app(token))
    service.start()
    try:
        (tmp_path / "x.py").write_text("print('never runs')\n")
        res = run(
            ["--rdzv-endpoint", service.endpoint, "--rdzv-id", "j", "--token", "wrong", "x.py"],
            tmp_path,
            timeout=60,
        )
    finally:
        service.stop()
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused the token" in lines[0], res.stderr
