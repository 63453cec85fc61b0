"""The shared service frame: auth, job scoping, health and metrics over a real socket."""

from __future__ import annotations

import httpx
from aiohttp import web

from lattice.common.auth import Authenticator, job_token
from lattice.common.http import BackgroundService, make_app


def _app(token: str) -> web.Application:
    app = make_app("test", Authenticator(token))

    async def get_job(request: web.Request) -> web.Response:
        return web.json_response({"job": request.match_info["job"]})

    app.router.add_get("/v1/jobs/{job}/thing", get_job)
    return app


def test_frame_auth_scoping_health_metrics(admin_token: str) -> None:
    svc = BackgroundService(lambda: _app(admin_token))
    port = svc.start()
    try:
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz").json()["status"] == "ok"
        assert httpx.get(f"{base}/v1/jobs/a/thing").status_code == 401
        bad = {"Authorization": "Bearer nope"}
        assert httpx.get(f"{base}/v1/jobs/a/thing", headers=bad).status_code == 401
        admin = {"Authorization": f"Bearer {admin_token}"}
        assert httpx.get(f"{base}/v1/jobs/a/thing", headers=admin).json() == {"job": "a"}
        job_a = {"Authorization": f"Bearer {job_token(admin_token, 'a')}"}
        assert httpx.get(f"{base}/v1/jobs/a/thing", headers=job_a).status_code == 200
        assert httpx.get(f"{base}/v1/jobs/b/thing", headers=job_a).status_code == 403
        assert httpx.get(f"{base}/v1/jobs/..%2Fx/thing", headers=admin).status_code in (400, 404)
        assert "lattice_http_requests" in httpx.get(f"{base}/metrics").text
    finally:
        svc.stop()
