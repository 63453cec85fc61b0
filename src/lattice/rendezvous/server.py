"""The rendezvous HTTP service: job-scoped rounds, heartbeats and a small KV, in memory.

Long-polls (join, round end, KV get) park on signals and answer the moment the state they
wait for changes, so a round end reaches every member within milliseconds. See
docs/rendezvous.md for the API and the rules rounds follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from lattice.common.auth import Authenticator
from lattice.common.http import caller, make_app, registry_of
from lattice.rendezvous.metrics import RendezvousMetrics
from lattice.rendezvous.models import (
    KV_KEY_RE,
    NODE_ID_RE,
    FailureBody,
    HeartbeatBody,
    JoinBody,
    NodeBody,
    RegisterBody,
    TargetBody,
    WithdrawBody,
    describe,
)
from lattice.rendezvous.state import KV_MAX_VALUE, Conflict, Refused, Rendezvous

STATE_KEY = web.AppKey("rendezvous_state", Rendezvous)
MAX_BODY = 1024 * 1024
GZIP_ABOVE = 16 * 1024  # round answers larger than this go out gzipped (one encode per round)
ROUND_END_HOLD_MAX_S = 60.0

_B = TypeVar("_B", bound=BaseModel)


def _error(status: int, message: str, code: str | None = None) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if code is not None:
        body["code"] = code
    return web.json_response(body, status=status)


class _Bad(Exception):
    def __init__(self, response: web.Response) -> None:
        self.response = response


async def _body(request: web.Request, model: type[_B]) -> _B:
    try:
        raw = await request.read()
    except ConnectionResetError:  # the client went away mid-request (closed, cancelled)
        raise _Bad(_error(400, "connection lost while reading the body")) from None
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        raise _Bad(_error(400, describe(exc), "invalid")) from None


def _wait_s(request: web.Request, limit: float) -> float:
    text = request.query.get("wait_s", "0")
    try:
        value = float(text)
    except ValueError:
        raise _Bad(
            _error(400, f"invalid wait_s {text!r}: use seconds, e.g. 10", "invalid")
        ) from None
    if not math.isfinite(value) or value < 0 or value > limit:
        raise _Bad(_error(400, f"invalid wait_s {text!r}: use 0 to {limit:g} seconds", "invalid"))
    return value


def _generation(request: web.Request) -> int:
    text = request.match_info["generation"]
    if not text.isdigit() or int(text) < 1:
        raise _Bad(_error(400, f"invalid generation {text!r}: use a positive integer", "invalid"))
    return int(text)


def _kv_key(request: web.Request) -> str:
    key = request.match_info["key"]
    if not KV_KEY_RE.fullmatch(key) or ".." in key.split("/"):
        raise _Bad(
            _error(400, f"invalid key {key!r}: 1-256 of letters, digits, '._:/-'", "invalid")
        )
    return key


@web.middleware
async def _refusals(request: web.Request, handler: Any) -> web.StreamResponse:
    """Turn this module's validation and state errors into JSON 4xx answers."""
    try:
        return await handler(request)
    except _Bad as bad:
        return bad.response
    except Refused as exc:
        return _error(exc.status, str(exc), "refused")
    except Conflict as exc:
        return _error(409, str(exc), "conflict")


def create_app(
    token: str,
    *,
    settle_s: float = 1.0,
    lease_s: float = 3.0,
    rejoin_grace_s: float = 30.0,
) -> web.Application:
    """The rendezvous service as an aiohttp app (served by `lattice rendezvous serve`,
    embedded by `lattice run` standalone and `lattice up`)."""
    if settle_s < 0 or lease_s <= 0 or rejoin_grace_s < 0:
        raise ValueError("settle_s and rejoin_grace_s must be >= 0 and lease_s > 0")
    app = make_app("rendezvous", Authenticator(token), max_body=MAX_BODY)
    app.middlewares.append(_refusals)
    state = Rendezvous(settle_s=settle_s, lease_s=lease_s, rejoin_grace_s=rejoin_grace_s)
    state.metrics = RendezvousMetrics(
        registry_of(app),
        jobs=lambda: len(state.jobs),
        members=state.count_members,
        waiting=state.count_waiting,
    )
    app[STATE_KEY] = state
    app.cleanup_ctx.append(_sweeper)
    app.on_shutdown.append(_release_polls)
    _routes(app)
    return app


async def _sweeper(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE_KEY]
    state.started_at = state.now()
    tick = min(0.25, max(0.02, state.lease_s / 8))

    async def loop() -> None:
        while True:
            await asyncio.sleep(tick)
            state.sweep()

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _release_polls(app: web.Application) -> None:
    """On shutdown, answer parked long-polls now so clients reconnect to the next instance."""
    app[STATE_KEY].lot.release_all()


def _routes(app: web.Application) -> None:
    r = app.router
    base = "/v1/jobs/{job}"
    r.add_post(f"{base}/join", _join)
    r.add_post(f"{base}/withdraw", _withdraw)
    r.add_post(f"{base}/register", _register)
    r.add_post(f"{base}/heartbeat", _heartbeat)
    r.add_post(f"{base}/leave", _leave)
    r.add_get(f"{base}/rounds/{{generation}}/end", _round_end)
    r.add_post(f"{base}/rounds/{{generation}}/failure", _failure)
    r.add_post(f"{base}/rounds/{{generation}}/succeeded", _succeeded)
    r.add_put(f"{base}/kv/{{key:.+}}", _kv_put)
    r.add_get(f"{base}/kv/{{key:.+}}", _kv_get)
    r.add_get(base, _status)
    r.add_put(f"{base}/target", _target)


def _state(request: web.Request) -> Rendezvous:
    return request.app[STATE_KEY]


def _job_name(request: web.Request) -> str:
    return request.match_info["job"]


async def _join(request: web.Request) -> web.Response:
    body = await _body(request, JoinBody)
    state = _state(request)
    job = state.must_job(_job_name(request))
    node = state.join(job, body)
    if state.round_for(job, node) is None and body.wait_s > 0:
        await node.wake.wait(min(body.wait_s, state.lease_s / 2))
        if job.nodes.get(node.node_id) is node:
            node.last_seen = state.now()
    rnd = state.round_for(job, node)
    if rnd is None:
        current = job.round.generation if job.round is not None else None
        return web.json_response(
            {"status": "waiting", "lease_s": state.lease_s, "generation": current}
        )
    plain = rnd.ready_body(job.name, state.lease_s)
    if len(plain) < GZIP_ABOVE or "gzip" not in request.headers.get("Accept-Encoding", ""):
        return web.Response(body=plain, content_type="application/json")
    return web.Response(
        body=rnd.ready_body_gzip(job.name, state.lease_s),
        content_type="application/json",
        headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"},
    )


async def _withdraw(request: web.Request) -> web.Response:
    body = await _body(request, WithdrawBody)
    state = _state(request)
    job = state.job(_job_name(request), create=False)
    if job is not None:
        state.withdraw(job, body.node_id, body.join_id)
    return web.json_response({"status": "ok"})


async def _register(request: web.Request) -> web.Response:
    body = await _body(request, RegisterBody)
    state = _state(request)
    status, end = state.register(state.must_job(_job_name(request)), body)
    answer: dict[str, Any] = {"status": status, "lease_s": state.lease_s}
    if end is not None:
        answer["end"] = end.to_json()
    return web.json_response(answer)


async def _heartbeat(request: web.Request) -> web.Response:
    body = await _body(request, HeartbeatBody)
    state = _state(request)
    job = state.job(_job_name(request), create=False)
    if job is None or not state.heartbeat(job, body.node_id):
        return _error(404, f"node {body.node_id!r} is not known to the service", "unknown_node")
    return web.json_response({"status": "ok", "lease_s": state.lease_s})


async def _leave(request: web.Request) -> web.Response:
    body = await _body(request, NodeBody)
    state = _state(request)
    job = state.job(_job_name(request), create=False)
    if job is not None:
        state.leave(job, body.node_id)
    return web.json_response({"status": "ok"})


async def _round_end(request: web.Request) -> web.Response:
    state = _state(request)
    gen = _generation(request)
    wait_s = _wait_s(request, ROUND_END_HOLD_MAX_S)
    node_id = request.query.get("node_id")
    if node_id is not None and not _valid_node(node_id):
        return _error(400, f"invalid node_id {node_id!r}", "invalid")
    job = state.job(_job_name(request), create=False)
    if job is None:
        return _error(404, f"round {gen} is not known to the service", "unknown_round")
    if node_id is not None and (node := job.nodes.get(node_id)) is not None:
        node.last_seen = state.now()
    rnd = job.round
    if rnd is not None and rnd.generation == gen:
        if rnd.end is None:
            await rnd.signal.wait(wait_s)
        if rnd.end is None:
            return web.json_response({"ended": False})
        return web.json_response({"ended": True, "end": rnd.end.to_json()})
    if gen in job.history:
        return web.json_response({"ended": True, "end": job.history[gen].to_json()})
    if rnd is not None and rnd.generation > gen:
        end = {
            "generation": gen,
            "reason": "node_lost",
            "detail": f"round {gen} was replaced by round {rnd.generation}",
            "graceful": False,
        }
        return web.json_response({"ended": True, "end": end})
    return _error(404, f"round {gen} is not known to the service", "unknown_round")


async def _failure(request: web.Request) -> web.Response:
    gen = _generation(request)
    body = await _body(request, FailureBody)
    state = _state(request)
    job = state.job(_job_name(request), create=False)
    if job is None or job.round is None or job.round.generation < gen:
        return _error(404, f"round {gen} is not known to the service", "unknown_round")
    state.failure(job, gen, body.node_id, body.detail)
    return web.json_response({"status": "ok"})


async def _succeeded(request: web.Request) -> web.Response:
    gen = _generation(request)
    body = await _body(request, NodeBody)
    state = _state(request)
    job = state.job(_job_name(request), create=False)
    if job is None or job.round is None or job.round.generation < gen:
        return _error(404, f"round {gen} is not known to the service", "unknown_round")
    state.succeeded(job, gen, body.node_id)
    return web.json_response({"status": "ok"})


async def _kv_put(request: web.Request) -> web.Response:
    key = _kv_key(request)
    length = request.content_length
    if length is not None and length > KV_MAX_VALUE:
        return _error(413, f"value of {length} bytes is larger than {KV_MAX_VALUE}", "refused")
    value = await request.read()
    state = _state(request)
    state.kv_set(state.must_job(_job_name(request)), key, value)
    return web.json_response({"status": "ok"})


async def _kv_get(request: web.Request) -> web.StreamResponse:
    key = _kv_key(request)
    wait_s = _wait_s(request, ROUND_END_HOLD_MAX_S)
    state = _state(request)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        job = state.job(_job_name(request), create=wait_s > 0)
        value = job.kv.get(key) if job is not None else None
        if value is not None:
            return web.Response(body=value, content_type="application/octet-stream")
        left = deadline - loop.time()
        if job is None or left <= 0 or state.lot.closing:
            return _error(404, f"key {key!r} is not set", "not_found")
        await job.kv_signal.wait(left)


async def _status(request: web.Request) -> web.Response:
    state = _state(request)
    name = _job_name(request)
    job = state.job(name, create=False)
    if job is None:
        return web.json_response(
            {"job": name, "generation": None, "running": False, "members": [], "waiting": []}
        )
    return web.json_response(job.status(state.now()))


async def _target(request: web.Request) -> web.Response:
    if not caller(request).admin:
        return _error(403, "setting a job's target size needs the admin token", "forbidden")
    body = await _body(request, TargetBody)
    state = _state(request)
    state.set_target(state.must_job(_job_name(request)), body.size)
    return web.json_response({"status": "ok", "target": body.size})


def _valid_node(node_id: str) -> bool:
    return NODE_ID_RE.fullmatch(node_id) is not None
