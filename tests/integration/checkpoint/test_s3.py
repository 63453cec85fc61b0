"""The same protocol on S3: a real moto server process on loopback."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from lattice.checkpoint.errors import CorruptCheckpoint, RoundSuperseded
from lattice.checkpoint.server import create_app
from lattice.common.auth import job_token
from lattice.common.http import BackgroundService


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="ckpt")
    try:
        yield endpoint
    finally:
        server.stop()


def test_s3_round_trip_commit_and_corruption(s3_endpoint: str, admin_token: str) -> None:
    options = {"endpoint_url": s3_endpoint, "skip_instance_cache": True}
    svc = BackgroundService(
        lambda: create_app(admin_token, "s3://ckpt/lattice", keep=2, storage_options=options)
    )
    svc.start()
    try:
        from lattice.checkpoint.client import CheckpointClient

        with CheckpointClient(svc.endpoint, "job-s3", job_token(admin_token, "job-s3")) as c:
            assert c.list() == []
            for step in (1, 2, 3):
                c.commit(step, {"model": c.put_shard(step, "model", f"w{step}".encode() * 500)}, {})
            assert [m.step for m in c.list()] == [3, 2]
            assert c.get_shard(3, "model") == b"w3" * 500
            import boto3

            s3 = boto3.client("s3", endpoint_url=s3_endpoint)
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ckpt")["Contents"]]
            (shard_key,) = [k for k in keys if "/000000000003/shards/" in k]
            s3.put_object(Bucket="ckpt", Key=shard_key, Body=b"w3" * 499 + b"XX")
            with pytest.raises(CorruptCheckpoint):
                c.get_shard(3, "model")
            manifest, shards = c.read_latest_good()
            assert manifest.step == 2 and shards["model"] == b"w2" * 500
            # The round fence is an object beside the steps: refused commits change nothing.
            assert c.fence(7) == 7 and c.current_round() == 7
            with pytest.raises(RoundSuperseded):
                c.commit(4, {"model": c.put_shard(4, "model", b"late")}, {"round": 6})
            assert [m.step for m in c.list()] == [3, 2]
            assert "lattice/job-s3/ROUND.json" in [
                o["Key"] for o in s3.list_objects_v2(Bucket="ckpt")["Contents"]
            ]
    finally:
        svc.stop()
