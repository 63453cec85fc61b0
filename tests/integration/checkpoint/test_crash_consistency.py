"""Kill the service at every step of the commit protocol: only complete checkpoints survive."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lattice.checkpoint.client import CheckpointClient
from lattice.checkpoint.errors import CheckpointUnavailable
from lattice.checkpoint.faults import POINTS
from lattice.common.auth import job_token

TOKEN = "crash-test-admin-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(data: Path, port: int, fault: str | None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "LATTICE_TOKEN": TOKEN}
    env.pop("LATTICE_FAULT_POINT", None)
    if fault:
        env["LATTICE_FAULT_POINT"] = fault
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lattice",
            "checkpoint",
            "serve",
            "--port",
            str(port),
            "--data",
            str(data),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"service exited early: {proc.stderr.read().decode()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("service did not become healthy in 60 s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    if proc.stderr:
        proc.stderr.close()


@pytest.mark.parametrize("point", POINTS)
def test_crash_at_every_fault_point(tmp_path: Path, point: str) -> None:
    data, port = tmp_path / "data", _free_port()
    client = lambda: CheckpointClient(  # noqa: E731
        f"127.0.0.1:{port}", "job-a", job_token(TOKEN, "job-a"), retry_for=0.5
    )
    proc = _start(data, port, None)
    try:
        with client() as c:
            c.commit(1, {"model": c.put_shard(1, "model", b"good-1")}, {"step": 1})
    finally:
        _stop(proc)

    proc = _start(data, port, point)
    crashed = False
    try:
        with client() as c:
            info = c.put_shard(2, "model", b"new-2" * 1000)
            c.commit(2, {"model": info}, {"step": 2})
    except (CheckpointUnavailable, httpx.TransportError):
        crashed = True
    finally:
        assert proc.wait(timeout=30) == 1 or proc.poll() is not None
        _stop(proc)
    assert crashed, f"the service did not stop at {point}"

    proc = _start(data, port, None)
    try:
        with client() as c:
            steps = [m.step for m in c.list()]
            manifest, shards = c.read_latest_good()
        if point == "commit-after-manifest":
            assert steps == [2, 1] and shards["model"] == b"new-2" * 1000
        else:
            assert steps == [1] and manifest.step == 1 and shards["model"] == b"good-1"
    finally:
        _stop(proc)


def test_retention_hides_a_checkpoint_before_removing_its_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader racing retention must never see a commit with a shard gone."""
    from lattice.checkpoint.storage import MANIFEST, Storage

    storage = Storage(str(tmp_path))
    for step in (1, 2, 3):
        info = storage.write_shard("job", step, "state", [b"x" * 10])
        storage.commit("job", step, {"state": info}, {}, keep=10)
    removed: list[str] = []
    rm = storage.fs.rm

    def recording_rm(path: str, recursive: bool = False, **kwargs: object) -> None:
        step_dir = f"{tmp_path}/job/{1:012d}"
        if path.startswith(step_dir):
            # What is still visible when each removal starts.
            removed.append("manifest" if Path(step_dir, MANIFEST).exists() else "hidden")
        rm(path, recursive=recursive, **kwargs)

    monkeypatch.setattr(storage.fs, "rm", recording_rm)
    storage.apply_retention("job", keep=2)
    assert [m.step for m in storage.manifests("job")] == [3, 2]
    assert removed == ["manifest", "hidden"], removed  # manifest alone first, then the rest
    assert not Path(tmp_path, "job", f"{1:012d}").exists()
