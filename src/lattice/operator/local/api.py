"""The local control plane's HTTP API (admin token only) that the `lattice` commands use.

POST   /v1/apply                                   YAML/JSON text → [{key, result}]
GET    /v1/trainingjobs[?namespace=NS]             objects
GET    /v1/trainingjobs/{ns}/{name}                one object
GET    /v1/trainingjobs/{ns}/{name}/describe       object, workers, events
GET    /v1/trainingjobs/{ns}/{name}/logs           ?worker=I&offset.<pod>=N → new text
DELETE /v1/trainingjobs/{ns}/{name}                graceful
GET|PUT /v1/slots                                  {"slots": N}
POST   /v1/chaos/restart/{service}                 rendezvous|checkpoint: stop, start again
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from lattice.api import load_documents
from lattice.common.auth import Authenticator
from lattice.common.errors import UserError
from lattice.common.http import json_error, make_app
from lattice.operator.local.plane import ControlPlane

PLANE = web.AppKey("plane", ControlPlane)
MAX_LOG_CHUNK = 1 << 20


def create_app(plane: ControlPlane) -> web.Application:
    app = make_app("lattice-local", Authenticator(plane.token))
    app[PLANE] = plane
    app.router.add_post("/v1/apply", apply)
    app.router.add_get("/v1/trainingjobs", list_jobs)
    app.router.add_get("/v1/trainingjobs/{ns}/{name}", get_job)
    app.router.add_get("/v1/trainingjobs/{ns}/{name}/describe", describe)
    app.router.add_get("/v1/trainingjobs/{ns}/{name}/logs", logs)
    app.router.add_delete("/v1/trainingjobs/{ns}/{name}", delete)
    app.router.add_get("/v1/slots", get_slots)
    app.router.add_put("/v1/slots", put_slots)
    app.router.add_post("/v1/chaos/restart/{service}", restart_service)
    return app


def _key(request: web.Request) -> str:
    return f"{request.match_info['ns']}/{request.match_info['name']}"


async def apply(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    text = await request.text()
    try:
        jobs = load_documents(text)
    except UserError as exc:
        return json_error(400, str(exc))
    results = []
    for job in jobs:
        obj, result = plane.store.apply(job.to_dict())
        results.append({"apiVersion": obj["apiVersion"], "key": job.key, "result": result})
    plane.wake()
    return web.json_response({"results": results})


async def list_jobs(request: web.Request) -> web.Response:
    ns = request.query.get("namespace")
    items = [
        raw
        for raw, _ in request.app[PLANE].store.jobs()
        if ns is None or raw["metadata"]["namespace"] == ns
    ]
    return web.json_response({"apiVersion": "v1", "kind": "List", "items": items})


async def get_job(request: web.Request) -> web.Response:
    raw = request.app[PLANE].store.get(_key(request))
    if raw is None:
        return json_error(404, f'trainingjob "{request.match_info["name"]}" not found')
    return web.json_response(raw)


async def describe(request: web.Request) -> web.Response:
    found = request.app[PLANE].describe(_key(request))
    if found is None:
        return json_error(404, f'trainingjob "{request.match_info["name"]}" not found')
    return web.json_response(found)


async def logs(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    key = _key(request)
    if plane.store.get(key) is None:
        return json_error(404, f'trainingjob "{request.match_info["name"]}" not found')
    ns, name = key.split("/", 1)
    log_dir = plane.config.home / "logs" / ns
    worker = request.query.get("worker")
    pattern = f"{name}-worker-{worker}.log" if worker is not None else f"{name}-worker-*.log"
    chunks = {}
    for path in sorted(log_dir.glob(pattern), key=_worker_order):
        offset = int(request.query.get(f"offset.{path.stem}", "0"))
        chunks[path.stem] = _read_from(path, offset)
    return web.json_response({"logs": chunks})


def _worker_order(path: Path) -> tuple[int, str]:
    tail = path.stem.rsplit("-", 1)[-1]
    return (int(tail) if tail.isdigit() else 1 << 30, path.stem)


def _read_from(path: Path, offset: int) -> dict[str, object]:
    with open(path, "rb") as f:
        f.seek(max(0, offset))
        data = f.read(MAX_LOG_CHUNK)
    return {"text": data.decode(errors="replace"), "offset": max(0, offset) + len(data)}


async def delete(request: web.Request) -> web.Response:
    plane = request.app[PLANE]
    if not plane.store.mark_deleting(_key(request)):
        return json_error(404, f'trainingjob "{request.match_info["name"]}" not found')
    plane.wake()
    return web.json_response({"deleted": _key(request)})


async def get_slots(request: web.Request) -> web.Response:
    return web.json_response({"slots": request.app[PLANE].slots})


async def put_slots(request: web.Request) -> web.Response:
    body = await request.json()
    slots = body.get("slots") if isinstance(body, dict) else None
    if not isinstance(slots, int) or isinstance(slots, bool) or not 0 <= slots <= 4096:
        return json_error(400, "slots must be an integer in 0..4096")
    plane = request.app[PLANE]
    plane.slots = slots
    plane.wake()
    return web.json_response({"slots": slots})


async def restart_service(request: web.Request) -> web.Response:
    try:
        endpoint = await request.app[PLANE].restart_service(request.match_info["service"])
    except UserError as exc:
        return json_error(404, str(exc))
    return web.json_response({"restarted": request.match_info["service"], "endpoint": endpoint})
