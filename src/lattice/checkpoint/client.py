"""Checkpoint service client (sync, httpx): what the addon and `lattice checkpoint list` use.

Every shard is hashed on the way up (the commit names the hash the client computed, so a torn
or altered upload cannot be committed) and on the way down (a corrupt read raises
`CorruptCheckpoint`, and `read_latest_good` falls back to the previous checkpoint).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import httpx

from lattice.checkpoint.errors import (
    CheckpointAuthError,
    CheckpointRejected,
    CheckpointUnavailable,
    CorruptCheckpoint,
    RoundSuperseded,
)
from lattice.checkpoint.manifest import Manifest, ShardInfo
from lattice.checkpoint.names import check_shard, check_step

__all__ = ["CheckpointClient", "Manifest", "ShardInfo"]

log = logging.getLogger(__name__)
T = TypeVar("T")
CHUNK = 1 << 20


class CheckpointClient:
    """One job's checkpoints on a checkpoint service."""

    def __init__(
        self,
        endpoint: str,
        job: str,
        token: str,
        *,
        timeout: float = 60.0,
        retry_for: float = 30.0,
    ) -> None:
        base = endpoint if "://" in endpoint else f"http://{endpoint}"
        self.endpoint = endpoint
        self.job = job
        self._retry_for = retry_for
        self._root = f"/v1/jobs/{job}/checkpoints"
        self._http = httpx.Client(
            base_url=base.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
        )

    # transport ---------------------------------------------------------------------------
    def _call(self, fn: Callable[[], T]) -> T:
        deadline = time.monotonic() + self._retry_for
        delay = 0.1
        while True:
            try:
                return fn()
            except httpx.TransportError as exc:
                if time.monotonic() + delay > deadline:
                    raise CheckpointUnavailable(
                        f"checkpoint service at {self.endpoint} is not reachable ({exc}); "
                        "check LATTICE_CHECKPOINT_ENDPOINT / `lattice checkpoint serve`"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code in (401, 403):
            raise CheckpointAuthError(
                f"checkpoint service rejected the token ({response.status_code}): "
                "check LATTICE_TOKEN"
            )
        if response.status_code >= 400:
            try:
                body = response.json()
                message, reason = body.get("error", response.text), body.get("reason")
            except (ValueError, AttributeError):
                message, reason = response.text, None
            error = RoundSuperseded if reason == "stale_round" else CheckpointRejected
            raise error(f"checkpoint service: {message} ({response.status_code})")
        return response

    # writes ------------------------------------------------------------------------------
    def put_shard(self, step: int, name: str, data: bytes | Iterable[bytes]) -> ShardInfo:
        """Upload one shard (streamed when given an iterable of chunks)."""
        check_step(step)
        check_shard(name)
        path = f"{self._root}/{step}/shards/{name}"
        if isinstance(data, bytes | bytearray | memoryview):
            view = memoryview(data).cast("B")
            sha = hashlib.sha256(view).hexdigest()
            headers = {"X-Lattice-SHA256": sha, "Content-Length": str(len(view))}

            def send() -> httpx.Response:
                # In pieces: given one bytes body, httpcore slices off what each send() took
                # and so copies the rest every time (a 600 MB shard cost seconds of CPU).
                pieces = (bytes(view[i : i + CHUNK]) for i in range(0, len(view), CHUNK))
                return self._http.put(path, content=pieces, headers=headers)

            self._check(self._call(send))
            return ShardInfo(sha, len(view))
        digest, size = hashlib.sha256(), 0

        def hashed() -> Iterator[bytes]:
            nonlocal size
            for chunk in data:
                digest.update(chunk)
                size += len(chunk)
                yield bytes(chunk)

        # A stream can be sent once only: no retry (the caller retries the whole shard).
        try:
            response = self._http.put(path, content=hashed())
        except httpx.TransportError as exc:
            raise CheckpointUnavailable(f"upload of shard {name!r} broke off: {exc}") from exc
        stored = ShardInfo.parse(self._check(response).json())
        mine = ShardInfo(digest.hexdigest(), size)
        if stored != mine:
            raise CorruptCheckpoint(f"shard {name!r} was stored as {stored}, sent as {mine}")
        return mine

    def commit(
        self, step: int, shards: dict[str, ShardInfo], meta: dict[str, Any], keep: int | None = None
    ) -> Manifest:
        """Make the checkpoint visible; fails if any shard is missing or differs."""
        body: dict[str, Any] = {"shards": {k: v.to_dict() for k, v in shards.items()}, "meta": meta}
        if keep is not None:
            body["keep"] = keep
        response = self._call(
            lambda: self._http.post(f"{self._root}/{check_step(step)}/commit", json=body)
        )
        return Manifest.parse(self._check(response).json())

    def fence(self, generation: int) -> int:
        """Announce that round ``generation`` has started, before restoring: from then on the
        service refuses commits of older rounds (nodes cut off from a round that ended).
        Raises RoundSuperseded when a newer round has started."""
        body = {"round": generation}
        response = self._call(lambda: self._http.post(f"/v1/jobs/{self.job}/round", json=body))
        return int(self._check(response).json()["round"])

    # reads -------------------------------------------------------------------------------
    def current_round(self) -> int:
        """The job's fence: the newest round that announced itself or committed (0: none)."""
        response = self._call(lambda: self._http.get(f"/v1/jobs/{self.job}/round"))
        return int(self._check(response).json()["round"])

    def list(self) -> list[Manifest]:
        """Committed checkpoints of this job, newest first."""
        response = self._check(self._call(lambda: self._http.get(self._root)))
        found = []
        for raw in response.json().get("checkpoints", []):
            try:
                found.append(Manifest.parse(raw))
            except CorruptCheckpoint as exc:
                log.warning("skipping an invalid manifest from the service: %s", exc)
        return found

    def latest_good(self) -> Manifest | None:
        """The newest committed checkpoint with a valid manifest (shards verified on read)."""
        manifests = self.list()
        return manifests[0] if manifests else None

    def open_shard(self, step: int, name: str) -> Iterator[bytes]:
        """Stream a shard; raises CorruptCheckpoint at the end if it does not hash right."""
        check_step(step)
        check_shard(name)
        request = self._http.build_request("GET", f"{self._root}/{step}/shards/{name}")
        response = self._call(lambda: self._http.send(request, stream=True))
        with contextlib.closing(response):
            if response.status_code == 422:
                response.read()
                raise CorruptCheckpoint(response.json().get("error", "corrupt shard"))
            if response.status_code >= 400:
                response.read()
            self._check(response)
            expected = response.headers.get("X-Lattice-SHA256", "")
            digest = hashlib.sha256()
            try:
                # As they arrive (64 KiB): re-chunking to CHUNK copied every byte once more.
                for chunk in response.iter_bytes():
                    digest.update(chunk)
                    yield chunk
            except httpx.TransportError as exc:
                raise CorruptCheckpoint(
                    f"shard {name!r} of step {step}: torn read ({exc})"
                ) from exc
            if digest.hexdigest() != expected:
                raise CorruptCheckpoint(f"shard {name!r} of step {step} fails its checksum")

    def get_shard(self, step: int, name: str) -> bytes:
        return b"".join(self.open_shard(step, name))

    def read_latest_good(
        self, names: Iterable[str] | None = None
    ) -> tuple[Manifest, dict[str, bytes]] | None:
        """The newest checkpoint whose shards (all, or ``names``) all verify, with their bytes.

        A corrupt checkpoint is skipped for the previous one, with a log line.
        """
        wanted = None if names is None else set(names)
        for manifest in self.list():
            picked = [n for n in manifest.shards if wanted is None or n in wanted]
            try:
                return manifest, {n: self.get_shard(manifest.step, n) for n in picked}
            except CorruptCheckpoint as exc:
                log.warning(
                    "checkpoint %s step %d is unusable (%s); trying the previous one",
                    self.job,
                    manifest.step,
                    exc,
                )
        return None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CheckpointClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
