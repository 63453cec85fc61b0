"""How the checkpoint client puts a shard on the wire."""

from __future__ import annotations

import hashlib
import os

import httpx

from lattice.checkpoint.client import CHUNK, CheckpointClient


class Recorder(httpx.BaseTransport):
    """Answers every request with 200 and keeps what the body was sent as."""

    def __init__(self) -> None:
        self.pieces: list[int] = []
        self.headers: httpx.Headers | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.headers = request.headers
        self.pieces = [len(piece) for piece in request.stream]  # type: ignore[union-attr]
        return httpx.Response(200, json={})


def test_a_large_shard_goes_up_in_pieces_with_its_length_and_hash() -> None:
    """One bytes body made httpcore copy the unsent rest after every send(): a 600 MB shard
    cost 27 s of CPU to upload. In pieces of at most CHUNK it costs one pass."""
    data = os.urandom(1 << 16) * (3 * CHUNK // (1 << 16) + 1)  # a bit over 3 chunks
    recorder = Recorder()
    client = CheckpointClient("127.0.0.1:9", "job-a", "token")
    client._http = httpx.Client(base_url="http://127.0.0.1:9", transport=recorder)
    info = client.put_shard(7, "state", data)
    assert info.sha256 == hashlib.sha256(data).hexdigest() and info.size == len(data)
    assert sum(recorder.pieces) == len(data) and max(recorder.pieces) <= CHUNK
    assert len(recorder.pieces) == 4
    assert recorder.headers is not None
    assert recorder.headers["content-length"] == str(len(data))
    assert "transfer-encoding" not in recorder.headers  # sent as is, not re-framed
    assert recorder.headers["x-lattice-sha256"] == info.sha256
