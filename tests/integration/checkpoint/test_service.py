"""Checkpoint service over real HTTP: commits, checksums, retention, auth, bad names."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import httpx
import pytest

from lattice.checkpoint.client import CheckpointClient
from lattice.checkpoint.errors import (
    CheckpointAuthError,
    CheckpointRejected,
    CorruptCheckpoint,
    RoundSuperseded,
)
from lattice.checkpoint.manifest import ShardInfo
from lattice.common.auth import job_token


def _commit(client, step: int, payload: dict[str, bytes], meta: dict | None = None):
    shards = {name: client.put_shard(step, name, data) for name, data in payload.items()}
    return client.commit(step, shards, meta or {"step": step})


def _stored_files(data: Path) -> list[Path]:
    return [p for p in data.rglob("*") if p.is_file()]


def test_round_trip_and_visibility_only_after_commit(ckpt_service) -> None:
    with ckpt_service.client() as c:
        info = c.put_shard(10, "model", b"weights" * 1000)
        assert info == ShardInfo(hashlib.sha256(b"weights" * 1000).hexdigest(), 7000)
        assert c.list() == [] and c.latest_good() is None
        manifest = c.commit(10, {"model": info}, {"epoch": 1})
        assert manifest.step == 10 and manifest.meta == {"epoch": 1}
        assert c.latest_good().step == 10
        assert c.get_shard(10, "model") == b"weights" * 1000


def test_streamed_large_shard(ckpt_service) -> None:
    chunk = os.urandom(1 << 20)
    digest = hashlib.sha256()
    for _ in range(64):
        digest.update(chunk)
    with ckpt_service.client() as c:
        info = c.put_shard(1, "big", (chunk for _ in range(64)))
        assert info.size == 64 << 20 and info.sha256 == digest.hexdigest()
        c.commit(1, {"big": info}, {})
        got = hashlib.sha256()
        n = 0
        for piece in c.open_shard(1, "big"):
            got.update(piece)
            n += 1
        assert got.hexdigest() == info.sha256
        assert n > 1  # streamed in chunks, not one body


def test_commit_rejects_missing_or_mismatched_shards(ckpt_service) -> None:
    with ckpt_service.client() as c:
        real = c.put_shard(5, "model", b"abc")
        with pytest.raises(CheckpointRejected, match="not stored"):
            c.commit(5, {"model": ShardInfo("0" * 64, 3)}, {})
        with pytest.raises(CheckpointRejected, match="not stored"):
            c.commit(5, {"model": real, "optim": ShardInfo("1" * 64, 1)}, {})
        with pytest.raises(CheckpointRejected, match="bytes"):
            c.commit(5, {"model": ShardInfo(real.sha256, 4)}, {})
        assert c.list() == []


def test_flipped_byte_falls_back_to_previous(ckpt_service, caplog) -> None:
    with ckpt_service.client() as c:
        _commit(c, 1, {"model": b"one" * 100})
        _commit(c, 2, {"model": b"two" * 100})
        (shard,) = (ckpt_service.data / "job-a" / f"{2:012d}" / "shards").iterdir()
        raw = bytearray(shard.read_bytes())
        raw[10] ^= 0xFF
        shard.write_bytes(bytes(raw))
        with pytest.raises(CorruptCheckpoint):
            c.get_shard(2, "model")
        with caplog.at_level(logging.WARNING):
            manifest, shards = c.read_latest_good()
        assert manifest.step == 1 and shards["model"] == b"one" * 100
        assert "step 2 is unusable" in caplog.text


def test_missing_or_garbage_manifest_is_skipped(ckpt_service, caplog) -> None:
    with ckpt_service.client() as c:
        _commit(c, 1, {"model": b"one"})
        _commit(c, 2, {"model": b"two"})
        _commit(c, 3, {"model": b"three"})
        (ckpt_service.data / "job-a" / f"{3:012d}" / "MANIFEST.json").unlink()
        (ckpt_service.data / "job-a" / f"{2:012d}" / "MANIFEST.json").write_text("{not json")
        with caplog.at_level(logging.WARNING):
            assert [m.step for m in c.list()] == [1]
        assert "skipping checkpoint job-a step 2" in caplog.text


def test_retention_keeps_last_k(ckpt_service) -> None:
    with ckpt_service.client() as c:
        for step in range(1, 7):
            _commit(c, step, {"model": f"s{step}".encode()})
        assert [m.step for m in c.list()] == [6, 5, 4]
        _commit(c, 7, {"model": b"s7"}, None)
        assert [m.step for m in c.list()] == [7, 6, 5]
    steps = sorted(p.name for p in (ckpt_service.data / "job-a").iterdir() if p.name != ".tmp")
    assert steps == [f"{s:012d}" for s in (5, 6, 7)]


def test_a_newer_round_wins_over_a_higher_step_of_an_older_one(ckpt_service) -> None:
    """Round 2 restored step 4 and went on (5 being uploaded); a node of round 1 that was
    cut off committed step 9 before round 2 announced itself. Its history was abandoned:
    newest and retention follow the round first, and round 2's upload in flight is not taken
    for a torn step, neither before round 2's first commit nor after it."""
    job = ckpt_service.data / "job-a"
    with ckpt_service.client() as c:
        for step in (3, 4):
            _commit(c, step, {"model": b"r1"}, {"round": 1})
        five = c.put_shard(5, "model", b"r2")
        _commit(c, 9, {"model": b"late"}, {"round": 1})  # before round 2 committed anything
        c.commit(5, {"model": five}, {"round": 2})
        _commit(c, 6, {"model": b"r2"}, {"round": 2})
        c.put_shard(7, "model", b"r2")
        assert [(m.round, m.step) for m in c.list()] == [(2, 6), (2, 5), (1, 9)]
        assert c.latest_good().step == 6 and c.get_shard(6, "model") == b"r2"
        assert (job / f"{7:012d}").is_dir()
        for step in (8, 11, 12):
            _commit(c, step, {"model": b"r3"}, {"round": 3})
        assert [(m.round, m.step) for m in c.list()] == [(3, 12), (3, 11), (3, 8)]
    # Torn step 7 is dropped once every kept commit is above it.
    assert sorted(p.name for p in job.iterdir() if p.is_dir() and p.name != ".tmp") == [
        f"{s:012d}" for s in (8, 11, 12)
    ]


def test_an_ended_round_cannot_commit_once_a_newer_one_has_fenced_or_committed(
    ckpt_service,
) -> None:
    """A node of round 1 cut off from the job keeps uploading. Once round 2 has announced
    itself (before it restores) or committed, round 1's commits are refused with a reason of
    their own, and nothing they would change (the listing, step 6's manifest) changes."""
    with ckpt_service.client() as c:
        _commit(c, 4, {"model": b"r1"}, {"round": 1})
        assert c.fence(2) == 2
        late = c.put_shard(6, "model", b"late")  # an upload alone is invisible: accepted
        with pytest.raises(RoundSuperseded, match=r"round 1 .* has ended: round 2"):
            c.commit(6, {"model": late}, {"round": 1})
        assert [(m.round, m.step) for m in c.list()] == [(1, 4)]  # what round 2 restores
        _commit(c, 5, {"model": b"r2"}, {"round": 2})
        _commit(c, 6, {"model": b"r2-six"}, {"round": 2})
        with pytest.raises(RoundSuperseded):  # would overwrite round 2's manifest of step 6
            c.commit(6, {"model": late}, {"round": 1})
        assert c.get_shard(6, "model") == b"r2-six"
        with pytest.raises(RoundSuperseded):  # the ended round's own restart is fenced too
            c.fence(1)
        assert c.fence(2) == 2  # the same round again: idempotent
        # A commit from a newer round raises the fence without an announcement.
        _commit(c, 7, {"model": b"r3"}, {"round": 3})
        with pytest.raises(RoundSuperseded):
            c.commit(8, {"model": c.put_shard(8, "model", b"r2")}, {"round": 2})
        assert [(m.round, m.step) for m in c.list()] == [(3, 7), (2, 6), (2, 5)]
        with ckpt_service.client("job-b") as other:  # fences are per job
            _commit(other, 1, {"model": b"b"}, {"round": 1})
    stale = httpx.get(f"http://{ckpt_service.endpoint}/metrics").text
    assert "lattice_checkpoint_stale_round_refusals_total 4.0" in stale


def test_the_fence_survives_a_service_restart_and_a_damaged_fence_file(
    tmp_path: Path, admin_token: str
) -> None:
    from lattice.checkpoint.server import create_app
    from lattice.common.http import BackgroundService

    data = tmp_path / "data"

    def client(svc: BackgroundService) -> CheckpointClient:
        return CheckpointClient(svc.endpoint, "job-a", job_token(admin_token, "job-a"))

    svc = BackgroundService(lambda: create_app(admin_token, str(data)))
    svc.start()
    with client(svc) as c:
        _commit(c, 1, {"model": b"r4"}, {"round": 4})
        c.fence(5)
    svc.stop()
    svc = BackgroundService(lambda: create_app(admin_token, str(data)))
    svc.start()
    try:
        with client(svc) as c:
            with pytest.raises(RoundSuperseded, match="round 5"):
                c.commit(2, {"model": c.put_shard(2, "model", b"r4")}, {"round": 4})
            (data / "job-a" / "ROUND.json").write_bytes(b"{torn")
            # Unreadable: the newest commit's round (4) stands in; nothing is lost.
            _commit(c, 2, {"model": b"r4"}, {"round": 4})
            with pytest.raises(RoundSuperseded, match="round 3"):
                c.fence(3)
            assert [m.step for m in c.list()] == [2, 1]
    finally:
        svc.stop()


@pytest.mark.parametrize("body", [{}, {"round": -1}, {"round": "2"}, {"round": True}, [1]])
def test_a_malformed_round_is_a_clear_400(ckpt_service, body) -> None:
    token = job_token(ckpt_service.token, "job-a")
    response = httpx.post(
        f"http://{ckpt_service.endpoint}/v1/jobs/job-a/round",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 400 and "round" in response.json()["error"]
    assert not (ckpt_service.data / "job-a" / "ROUND.json").exists()


def test_client_disconnect_mid_stream_leaves_nothing(ckpt_service) -> None:
    def broken():
        yield b"x" * (1 << 20)
        raise RuntimeError("writer died")

    with ckpt_service.client() as c:
        with pytest.raises(RuntimeError):
            c.put_shard(1, "model", broken())
        assert c.list() == []
        with pytest.raises(CheckpointRejected):
            c.commit(
                1, {"model": ShardInfo(hashlib.sha256(b"x" * (1 << 20)).hexdigest(), 1 << 20)}, {}
            )
    assert not [p for p in _stored_files(ckpt_service.data) if "shards" in p.parts]


def test_sha_header_mismatch_rejected(ckpt_service) -> None:
    url = f"http://{ckpt_service.endpoint}/v1/jobs/job-a/checkpoints/1/shards/model"
    headers = {"Authorization": f"Bearer {ckpt_service.token}", "X-Lattice-SHA256": "0" * 64}
    r = httpx.put(url, content=b"abc", headers=headers)
    assert r.status_code == 400 and "sha256" in r.json()["error"]


def test_tokens_scope_jobs(ckpt_service) -> None:
    with ckpt_service.client("job-a") as a:
        _commit(a, 1, {"model": b"secret-a"})
    other = job_token(ckpt_service.token, "job-b")
    for token in ("wrong", other, job_token("another-install", "job-a")):
        with ckpt_service.client("job-a", token=token) as c, pytest.raises(CheckpointAuthError):
            c.list()
        with ckpt_service.client("job-a", token=token) as c, pytest.raises(CheckpointAuthError):
            c.put_shard(2, "model", b"evil")
    with ckpt_service.client("job-b") as b:
        assert b.list() == []
    with ckpt_service.client("job-a") as a:
        assert [m.step for m in a.list()] == [1]
    base = f"http://{ckpt_service.endpoint}/v1/jobs/job-a/checkpoints"
    assert httpx.get(base).status_code == 401


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/job-a/checkpoints/1/shards/..%2F..%2Fescape",
        "/v1/jobs/job-a/checkpoints/1/shards/.hidden",
        "/v1/jobs/job-a/checkpoints/-1/shards/model",
        "/v1/jobs/job-a/checkpoints/abc/shards/model",
        "/v1/jobs/job-a/checkpoints/1234567890123/shards/model",
        "/v1/jobs/..%2Fescape/checkpoints/1/shards/model",
        "/v1/jobs/Job_A/checkpoints/1/shards/model",
    ],
)
def test_bad_names_rejected_and_nothing_written_outside(ckpt_service, path: str) -> None:
    url = f"http://{ckpt_service.endpoint}{path}"
    r = httpx.put(url, content=b"x", headers={"Authorization": f"Bearer {ckpt_service.token}"})
    assert r.status_code in (400, 404)
    root = ckpt_service.data.parent
    outside = [p for p in root.rglob("*") if p.is_file() and ckpt_service.data not in p.parents]
    assert outside == []


def test_malformed_commit_bodies(ckpt_service) -> None:
    url = f"http://{ckpt_service.endpoint}/v1/jobs/job-a/checkpoints/1/commit"
    auth = {"Authorization": f"Bearer {ckpt_service.token}"}
    for body in (
        b"{",
        b"[]",
        b'{"shards": 3}',
        b'{"shards": {"m": {"sha256": "x", "size": 1}}}',
        b'{"shards": {"m": {"sha256": "' + b"a" * 64 + b'", "size": -1}}}',
        b'{"shards": {}, "keep": 0}',
    ):
        r = httpx.post(url, content=body, headers={**auth, "Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, body
    assert httpx.get(f"http://{ckpt_service.endpoint}/healthz").status_code == 200
