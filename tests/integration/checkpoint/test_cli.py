"""`lattice checkpoint serve|list` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from lattice.common.auth import job_token


def _lattice(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "LATTICE_TOKEN"}
    return subprocess.run(
        [sys.executable, "-m", "lattice", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, **(env or {})},
    )


def test_serve_without_token_is_one_line_error(tmp_path) -> None:
    r = _lattice("checkpoint", "serve", "--data", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "lattice: error: the checkpoint service needs a token: pass --token or set LATTICE_TOKEN"
    )


def test_list_shows_committed_checkpoints(ckpt_service) -> None:
    with ckpt_service.client("job-a") as c:
        c.commit(7, {"model": c.put_shard(7, "model", b"abc")}, {"epoch": 2})
    env = {"LATTICE_TOKEN": job_token(ckpt_service.token, "job-a")}
    r = _lattice(
        "checkpoint",
        "list",
        "--job",
        "job-a",
        "--endpoint",
        ckpt_service.endpoint,
        "-o",
        "json",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    (entry,) = json.loads(r.stdout)
    assert entry["step"] == 7 and entry["meta"] == {"epoch": 2}
    table = _lattice(
        "checkpoint", "list", "--job", "job-a", "--endpoint", ckpt_service.endpoint, env=env
    )
    assert "7" in table.stdout and "STEP" in table.stdout
    denied = _lattice(
        "checkpoint", "list", "--job", "job-b", "--endpoint", ckpt_service.endpoint, env=env
    )
    assert denied.returncode == 2 and "rejected the token" in denied.stderr
    assert "Traceback" not in denied.stderr
