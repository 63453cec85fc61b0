"""The checkpoint service: per-job checkpoints over HTTP on top of `storage.Storage`.

Routes (all under a job; a job token opens only its own job):

    PUT  /v1/jobs/{job}/checkpoints/{step}/shards/{name}   raw bytes, streamed
    POST /v1/jobs/{job}/checkpoints/{step}/commit          {"shards": {name: info}, "meta": {}}
    GET  /v1/jobs/{job}/checkpoints                        committed, newest first
    GET  /v1/jobs/{job}/checkpoints/{step}                 one manifest
    GET  /v1/jobs/{job}/checkpoints/{step}/shards/{name}   raw bytes, streamed, X-Lattice-SHA256
    POST /v1/jobs/{job}/round                              {"round": N}: round N has started
    GET  /v1/jobs/{job}/round                              {"round": N}: the newest started

A commit or round older than the job's newest round is refused (409): see `storage`.

The service stores opaque bytes; it never deserialises what it receives beyond JSON bodies.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from prometheus_client import Counter

from lattice.checkpoint.errors import CorruptCheckpoint
from lattice.checkpoint.manifest import MAX_META_BYTES, ShardInfo
from lattice.checkpoint.names import check_shard, check_step
from lattice.checkpoint.storage import CHUNK, CommitError, StaleRound, Storage
from lattice.common.auth import Authenticator
from lattice.common.http import json_error, make_app, registry_of

log = logging.getLogger(__name__)

STORAGE_KEY = web.AppKey("checkpoint_storage", Storage)
KEEP_KEY = web.AppKey("checkpoint_keep", int)
METRICS_KEY = web.AppKey("checkpoint_metrics", dict)
SHA_HEADER = "X-Lattice-SHA256"
MAX_SHARD_BYTES = 1 << 40
MAX_KEEP = 1000
STALE_ROUND = "stale_round"


def create_app(
    token: str,
    storage_url: str,
    *,
    keep: int = 3,
    storage_options: dict[str, Any] | None = None,
) -> web.Application:
    """The checkpoint service as an aiohttp app (`lattice checkpoint serve`, `lattice up`)."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    storage = Storage(storage_url, storage_options)
    app = make_app("checkpoint", Authenticator(token))
    app[STORAGE_KEY] = storage
    app[KEEP_KEY] = keep
    registry = registry_of(app)
    app[METRICS_KEY] = {
        "bytes": Counter(
            "lattice_checkpoint_bytes_stored", "shard bytes stored", registry=registry
        ),
        "commits": Counter(
            "lattice_checkpoint_commits", "checkpoints committed", registry=registry
        ),
        "stale": Counter(
            "lattice_checkpoint_stale_round_refusals",
            "commits and fences refused because a newer round of the job had started",
            registry=registry,
        ),
        "corrupt": Counter(
            "lattice_checkpoint_corrupt_reads",
            "reads that failed their checksum",
            registry=registry,
        ),
    }
    base = "/v1/jobs/{job}/checkpoints"
    app.router.add_put(base + "/{step}/shards/{name}", put_shard)
    app.router.add_post(base + "/{step}/commit", commit)
    app.router.add_get(base, list_checkpoints)
    app.router.add_get(base + "/{step}", get_manifest)
    app.router.add_get(base + "/{step}/shards/{name}", get_shard)
    app.router.add_post("/v1/jobs/{job}/round", post_round)
    app.router.add_get("/v1/jobs/{job}/round", get_round)
    return app


def _target(request: web.Request) -> tuple[Storage, str, int]:
    job = request.match_info["job"]
    step = check_step(request.match_info["step"])
    return request.app[STORAGE_KEY], job, step


async def put_shard(request: web.Request) -> web.StreamResponse:
    storage, job, step = _target(request)
    name = check_shard(request.match_info["name"])
    expected = request.headers.get(SHA_HEADER)
    length = request.content_length
    if length is not None and length > MAX_SHARD_BYTES:
        return json_error(413, f"shard larger than {MAX_SHARD_BYTES} bytes")
    upload = await asyncio.to_thread(storage.begin_shard, job, step, name)
    try:
        async for chunk in request.content.iter_chunked(CHUNK):
            await asyncio.to_thread(upload.write, chunk)
            if upload.size > MAX_SHARD_BYTES:
                raise web.HTTPRequestEntityTooLarge(
                    max_size=MAX_SHARD_BYTES, actual_size=upload.size
                )
        if length is not None and upload.size != length:
            raise ValueError(f"body ended after {upload.size} of {length} bytes")
    except BaseException:
        await asyncio.to_thread(upload.abort)
        raise
    info = await asyncio.to_thread(upload.finish)
    if expected is not None and expected.lower() != info.sha256:
        return json_error(400, f"shard {name!r} arrived with sha256 {info.sha256}, not {expected}")
    request.app[METRICS_KEY]["bytes"].inc(info.size)
    return web.json_response(info.to_dict(), status=201)


async def commit(request: web.Request) -> web.Response:
    storage, job, step = _target(request)
    if request.content_length is not None and request.content_length > MAX_META_BYTES * 2:
        return json_error(413, "commit body too large")
    body = await request.json()
    if not isinstance(body, dict) or not isinstance(body.get("shards"), dict):
        return json_error(400, 'commit body must be {"shards": {name: {sha256, size}}, "meta": {}}')
    shards = {check_shard(k): ShardInfo.parse(v) for k, v in body["shards"].items()}
    meta = body.get("meta", {})
    if not isinstance(meta, dict):
        return json_error(400, "meta must be an object")
    keep = body.get("keep", request.app[KEEP_KEY])
    if not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= MAX_KEEP:
        return json_error(400, f"keep must be an integer in 1..{MAX_KEEP}")
    try:
        manifest = await asyncio.to_thread(storage.commit, job, step, shards, meta, keep)
    except StaleRound as exc:
        request.app[METRICS_KEY]["stale"].inc()
        log.warning("refused a commit of %s step %d: %s", job, step, exc)
        return _stale(exc)
    except CommitError as exc:
        return json_error(409, str(exc))
    request.app[METRICS_KEY]["commits"].inc()
    log.info("committed checkpoint %s step %d (%d shards)", job, step, len(shards))
    return web.json_response(manifest.to_dict(), status=201)


def _stale(exc: StaleRound) -> web.Response:
    """409 with a reason the client tells apart from a commit with a missing shard."""
    return web.json_response({"error": str(exc), "reason": STALE_ROUND}, status=409)


async def post_round(request: web.Request) -> web.Response:
    """A round announces itself before it restores: from then on, older rounds cannot commit."""
    storage, job = request.app[STORAGE_KEY], request.match_info["job"]
    body = await request.json()
    generation = body.get("round") if isinstance(body, dict) else None
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
        return json_error(400, 'body must be {"round": N} with N a non-negative integer')
    try:
        current = await asyncio.to_thread(storage.fence, job, generation)
    except StaleRound as exc:
        request.app[METRICS_KEY]["stale"].inc()
        return _stale(exc)
    return web.json_response({"round": current})


async def get_round(request: web.Request) -> web.Response:
    storage, job = request.app[STORAGE_KEY], request.match_info["job"]
    return web.json_response({"round": await asyncio.to_thread(storage.current_round, job)})


async def list_checkpoints(request: web.Request) -> web.Response:
    storage = request.app[STORAGE_KEY]
    manifests = await asyncio.to_thread(storage.manifests, request.match_info["job"])
    return web.json_response({"checkpoints": [m.to_dict() for m in manifests]})


async def get_manifest(request: web.Request) -> web.Response:
    storage, job, step = _target(request)
    manifest = await asyncio.to_thread(storage.manifest, job, step)
    if manifest is None:
        return json_error(404, f"no committed checkpoint at step {step} for job {job!r}")
    return web.json_response(manifest.to_dict())


async def get_shard(request: web.Request) -> web.StreamResponse:
    storage, job, step = _target(request)
    name = check_shard(request.match_info["name"])
    manifest = await asyncio.to_thread(storage.manifest, job, step)
    if manifest is None or name not in manifest.shards:
        return json_error(404, f"no shard {name!r} in a committed checkpoint at step {step}")
    info = manifest.shards[name]
    if request.method == "HEAD":  # headers only: body bytes would desync a keep-alive connection
        return web.Response(
            headers={
                SHA_HEADER: info.sha256,
                "Content-Type": "application/octet-stream",
                "Content-Length": str(info.size),
            }
        )
    chunks = storage.read_shard(manifest, name)
    try:
        first = await asyncio.to_thread(next, chunks, b"")
    except CorruptCheckpoint as exc:
        request.app[METRICS_KEY]["corrupt"].inc()
        return json_error(422, str(exc))
    response = web.StreamResponse(
        headers={SHA_HEADER: info.sha256, "Content-Type": "application/octet-stream"}
    )
    response.content_length = info.size
    await response.prepare(request)
    chunk = first
    try:
        while chunk:
            await response.write(chunk)
            chunk = await asyncio.to_thread(next, chunks, b"")
    except CorruptCheckpoint:
        # The bytes already sent are wrong: cut the connection so the client sees a torn read.
        request.app[METRICS_KEY]["corrupt"].inc()
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response
