"""The commit protocol over any fsspec filesystem (a local directory / PVC, or S3).

Layout under the root::

    <job>/.tmp/<random>                       uploads in progress
    <job>/<step:012d>/shards/<name>.<sha256>  a complete shard, named by its content hash
    <job>/<step:012d>/MANIFEST.json           written last, atomically: the commit
    <job>/ROUND.json                          the round fence: the newest round seen

A shard is streamed to a temporary object while it is hashed, then moved into place under a
name that carries its hash; a commit checks every listed shard is in place with that hash and
size, then writes the manifest to a temporary name and moves it into place. Only steps with a
manifest are visible, so a crash at any point leaves earlier commits intact and the torn one
invisible. Reads re-hash and compare with the manifest.

The fence: a round announces itself (`fence`) before it restores, and every commit names its
round (``meta.round``); a commit from a round older than the fence is refused. A node cut off
from a round that has ended can then never commit into the history that replaced it: not a
step that overwrites one of the new round's manifests, and not a checkpoint that changes what
the new round's ranks restore while they are fetching it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import posixpath
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec

from lattice.checkpoint.errors import CorruptCheckpoint
from lattice.checkpoint.faults import fault
from lattice.checkpoint.manifest import Manifest, ShardInfo
from lattice.checkpoint.names import check_job, check_shard, check_step

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MANIFEST = "MANIFEST.json"
FENCE = "ROUND.json"
TEMP_TTL_S = 3600.0


class CommitError(ValueError):
    """A commit that cannot be accepted (missing or mismatched shard): nothing was written."""


class StaleRound(CommitError):
    """A commit or fence from a round older than one the job has started since."""


class Storage:
    """Checkpoints of all jobs under one fsspec root. Blocking: call from worker threads."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.root = root.rstrip("/")
        self.url = url
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        if self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol:
            self.fs.makedirs(self.root, exist_ok=True)

    # paths -------------------------------------------------------------------------------
    def _job_dir(self, job: str) -> str:
        return posixpath.join(self.root, check_job(job))

    def _step_dir(self, job: str, step: int) -> str:
        return posixpath.join(self._job_dir(job), f"{check_step(step):012d}")

    def _shard_path(self, job: str, step: int, name: str, sha: str) -> str:
        return posixpath.join(self._step_dir(job, step), "shards", f"{check_shard(name)}.{sha}")

    def _job_lock(self, job: str) -> threading.Lock:
        """Fence and commit of one job are serialised (one service owns a storage root)."""
        with self._locks_guard:
            return self._locks.setdefault(job, threading.Lock())

    # rounds ------------------------------------------------------------------------------
    def fence(self, job: str, generation: int) -> int:
        """Record that round ``generation`` has started; the fence (newest round) after it.

        Raises StaleRound when a newer round has started: the caller's round has ended.
        """
        with self._job_lock(job):
            return self._raise_fence(job, generation)

    def current_round(self, job: str) -> int:
        """The fence: the newest round that announced itself or committed (0: none)."""
        stored = self._stored_fence(job)
        if stored is not None:
            return stored
        committed = self.manifests(job)  # no fence file yet, or a damaged one
        return committed[0].round if committed else 0

    def _stored_fence(self, job: str) -> int | None:
        try:
            with self.fs.open(posixpath.join(self._job_dir(job), FENCE), "rb") as f:
                value = json.loads(f.read()).get("round")
        except FileNotFoundError:  # none yet (or data of a version without fences)
            return None
        except (ValueError, AttributeError) as exc:
            # A damaged fence must not stop the job: the newest commit's round stands in.
            log.warning("round fence of job %s unreadable (%s); using its commits", job, exc)
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        log.warning("round fence of job %s holds %r; using its commits", job, value)
        return None

    def _raise_fence(self, job: str, generation: int) -> int:
        stored = self._stored_fence(job)
        current = self.current_round(job) if stored is None else stored
        if generation < current:
            raise StaleRound(
                f"round {generation} of job {job!r} has ended: round {current} has started "
                "since, and only it may commit"
            )
        if generation > 0 and generation != stored:  # newer, or no (readable) fence yet
            # Written to the job's temp area and moved into place: never half a fence.
            tmp_dir = posixpath.join(self._job_dir(job), ".tmp")
            self.fs.makedirs(tmp_dir, exist_ok=True)
            tmp = posixpath.join(tmp_dir, uuid.uuid4().hex)
            with self.fs.open(tmp, "wb") as out:
                out.write(json.dumps({"round": generation}).encode())
            self.fs.mv(tmp, posixpath.join(self._job_dir(job), FENCE))
        return generation

    # writes ------------------------------------------------------------------------------
    def begin_shard(self, job: str, step: int, name: str) -> ShardUpload:
        """Start streaming a shard: write chunks, then ``finish()`` (or ``abort()``)."""
        return ShardUpload(self, job, check_step(step), check_shard(name))

    def write_shard(self, job: str, step: int, name: str, chunks: Iterable[bytes]) -> ShardInfo:
        """Stream a shard into place; returns its hash and size."""
        upload = self.begin_shard(job, step, name)
        try:
            for chunk in chunks:
                upload.write(chunk)
        except BaseException:
            upload.abort()
            raise
        return upload.finish()

    def commit(
        self, job: str, step: int, shards: dict[str, ShardInfo], meta: dict[str, Any], keep: int
    ) -> Manifest:
        """Make a checkpoint visible once every listed shard is stored with its hash, unless
        its round (``meta.round``, 0 when absent) is older than the job's fence."""
        if not shards:
            raise CommitError("a checkpoint needs at least one shard")
        with self._job_lock(job):
            return self._commit(job, step, shards, meta, keep)

    def _commit(
        self, job: str, step: int, shards: dict[str, ShardInfo], meta: dict[str, Any], keep: int
    ) -> Manifest:
        for name, info in shards.items():
            path = self._shard_path(job, step, name, info.sha256)
            try:
                size = self.fs.size(path)
            except FileNotFoundError:
                size = None
            if size is None:
                raise CommitError(f"shard {name!r} with sha256 {info.sha256[:12]}… is not stored")
            if size != info.size:
                raise CommitError(f"shard {name!r} has {size} bytes, the commit says {info.size}")
        manifest = Manifest(job, step, time.time(), dict(shards), meta)
        self._raise_fence(job, manifest.round)
        fault("commit-before-manifest")
        step_dir = self._step_dir(job, step)
        tmp = posixpath.join(step_dir, f".{MANIFEST}.{uuid.uuid4().hex}")
        with self.fs.open(tmp, "wb") as out:
            out.write(manifest.to_json())
        fault("commit-manifest-temp-written")
        self.fs.mv(tmp, posixpath.join(step_dir, MANIFEST))
        fault("commit-after-manifest")
        self.apply_retention(job, keep)
        return manifest

    # reads -------------------------------------------------------------------------------
    def manifests(self, job: str) -> list[Manifest]:
        """Committed checkpoints, newest first (`Manifest.order`: round, then step); invalid
        manifests are skipped with a log line."""
        job_dir = self._job_dir(job)
        try:
            entries = self.fs.ls(job_dir, detail=False)
        except FileNotFoundError:
            return []
        found: list[Manifest] = []
        for entry in sorted(entries, reverse=True):
            base = posixpath.basename(entry.rstrip("/"))
            if not (base.isdigit() and len(base) == 12):
                continue
            path = posixpath.join(job_dir, base, MANIFEST)
            try:
                with self.fs.open(path, "rb") as f:
                    manifest = Manifest.parse(f.read())
            except FileNotFoundError:
                continue
            except CorruptCheckpoint as exc:
                log.warning("skipping checkpoint %s step %s: %s", job, int(base), exc)
                continue
            if manifest.job != job or manifest.step != int(base):
                log.warning("skipping checkpoint %s step %s: manifest names another", job, base)
                continue
            found.append(manifest)
        return sorted(found, key=lambda m: m.order, reverse=True)

    def manifest(self, job: str, step: int) -> Manifest | None:
        return next((m for m in self.manifests(job) if m.step == step), None)

    def read_shard(self, manifest: Manifest, name: str) -> Iterator[bytes]:
        """Stream a committed shard, raising CorruptCheckpoint at the end if it doesn't hash."""
        info = manifest.shards[check_shard(name)]
        path = self._shard_path(manifest.job, manifest.step, name, info.sha256)
        digest, size = hashlib.sha256(), 0
        try:
            f = self.fs.open(path, "rb")
        except FileNotFoundError as exc:
            raise CorruptCheckpoint(f"shard {name!r} of step {manifest.step} is missing") from exc
        with f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                yield chunk
        if size != info.size or digest.hexdigest() != info.sha256:
            log.warning(
                "checkpoint %s step %s shard %s fails its checksum",
                manifest.job,
                manifest.step,
                name,
            )
            raise CorruptCheckpoint(f"shard {name!r} of step {manifest.step} fails its checksum")

    # housekeeping ------------------------------------------------------------------------
    def apply_retention(self, job: str, keep: int) -> None:
        """Keep the newest ``keep`` commits (`Manifest.order`); drop torn steps below every
        kept one.

        An upload still running is for a step after the one its round restored, which is
        kept: a late commit of an abandoned round (a higher step, an older round) does not
        make the new round's first upload look torn unless ``keep`` such commits came first.
        """
        committed = self.manifests(job)
        kept = committed[: max(keep, 1)]
        for old in committed[max(keep, 1) :]:
            step_dir = self._step_dir(job, old.step)
            # The manifest first: the checkpoint stops being visible before any shard goes,
            # so a concurrent reader never finds a commit with a shard missing (and a crash
            # here leaves a torn step, which the loop below removes next time).
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(posixpath.join(step_dir, MANIFEST))
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(step_dir, recursive=True)
        if not kept:
            return
        floor = min(m.step for m in kept)
        job_dir = self._job_dir(job)
        for entry in self.fs.ls(job_dir, detail=False):
            base = posixpath.basename(entry.rstrip("/"))
            if base.isdigit() and int(base) < floor:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(entry, recursive=True)
        self._drop_stale_temps(job)

    def _drop_stale_temps(self, job: str) -> None:
        tmp_dir = posixpath.join(self._job_dir(job), ".tmp")
        try:
            entries = self.fs.ls(tmp_dir, detail=True)
        except FileNotFoundError:
            return
        now = time.time()
        for entry in entries:
            modified = entry.get("mtime") or entry.get("LastModified")
            stamp = modified.timestamp() if hasattr(modified, "timestamp") else modified
            if isinstance(stamp, int | float) and now - stamp > TEMP_TTL_S:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(entry["name"])


class ShardUpload:
    """One shard being streamed to a temporary object while it is hashed."""

    def __init__(self, storage: Storage, job: str, step: int, name: str) -> None:
        self._storage, self.job, self.step, self.name = storage, job, step, name
        tmp_dir = posixpath.join(storage._job_dir(job), ".tmp")
        storage.fs.makedirs(tmp_dir, exist_ok=True)
        self._tmp = posixpath.join(tmp_dir, uuid.uuid4().hex)
        self._out = storage.fs.open(self._tmp, "wb")
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._digest.update(chunk)
        self.size += len(chunk)
        self._out.write(chunk)

    def finish(self) -> ShardInfo:
        """Move the complete shard into place under its content hash."""
        fs = self._storage.fs
        try:
            self._out.close()
            fault("shard-temp-written")
            info = ShardInfo(self._digest.hexdigest(), self.size)
            final = self._storage._shard_path(self.job, self.step, self.name, info.sha256)
            fs.makedirs(posixpath.dirname(final), exist_ok=True)
            fault("shard-before-rename")
            fs.mv(self._tmp, final)
            fault("shard-after-rename")
            return info
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop a torn upload: nothing of it becomes visible."""
        with contextlib.suppress(Exception):
            self._out.close()
        with contextlib.suppress(Exception):
            self._storage.fs.rm(self._tmp)
