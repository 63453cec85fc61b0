"""The frame every Lattice HTTP service shares.

One place for bearer-token auth, job scoping, JSON errors, `/healthz`, `/readyz`, `/metrics`,
request size limits, and running a service in a background thread (embedded in `lattice run`,
`lattice up` and tests).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from lattice.common.auth import Authenticator, Caller, bearer

log = logging.getLogger(__name__)

CALLER_KEY = web.AppKey("caller_authenticator", Authenticator)
CALLER = web.RequestKey("caller", Caller)
REGISTRY_KEY = web.AppKey("metrics_registry", CollectorRegistry)
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
JOB_ID_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,251}[a-z0-9])?$")
DEFAULT_MAX_BODY = 4 * 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def caller(request: web.Request) -> Caller:
    """The authenticated caller of a request (set by the auth middleware)."""
    return request[CALLER]


def valid_job_id(job: str) -> bool:
    return bool(JOB_ID_RE.fullmatch(job)) and ".." not in job  # fullmatch: no trailing \n


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            return json_error(exc.status, exc.reason or exc.text or "error")
        raise
    except (ValueError, KeyError, TypeError) as exc:
        return json_error(400, f"bad request: {exc}")
    except RecursionError:  # a JSON body nested thousands deep
        return json_error(400, "bad request: the body is nested too deeply")
    except ConnectionResetError:  # the client went away mid-body: one line, not a traceback
        log.info(
            "%s %s: the client went away before the body was read", request.method, request.path
        )
        return json_error(400, "connection lost while reading the body")


def _auth_middleware(auth: Authenticator) -> Any:
    @web.middleware
    async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        who = auth.identify(bearer(request.headers.get("Authorization")))
        if who is None:
            return json_error(401, "missing or invalid bearer token")
        if request.match_info.http_exception is not None:
            return await handler(request)  # an unknown route: 404/405, nothing to guard
        job = request.match_info.get("job")
        if job is not None:
            if not valid_job_id(job):
                return json_error(
                    400, f"invalid job id {job!r}: use lowercase letters, digits, '-', '_', '.'"
                )
            if not who.may_access(job):
                return json_error(403, f"token does not grant access to job {job!r}")
        elif not who.admin and not getattr(handler, "job_token_ok", False):
            return json_error(403, "this endpoint needs the admin token")
        request[CALLER] = who
        return await handler(request)

    return _auth


def make_app(
    service: str,
    auth: Authenticator,
    *,
    max_body: int = DEFAULT_MAX_BODY,
    ready: Callable[[], bool] | None = None,
) -> web.Application:
    """An aiohttp app with auth, JSON errors, health, readiness and Prometheus metrics.

    Job-scoped routes must contain ``{job}``; a job token opens only its own job's routes.
    """
    registry = CollectorRegistry()
    requests = Counter(
        "lattice_http_requests", "HTTP requests served", ["service", "status"], registry=registry
    )

    @web.middleware
    async def _count(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        requests.labels(service, str(response.status)).inc()
        return response

    app = web.Application(
        client_max_size=max_body, middlewares=[_count, _errors, _auth_middleware(auth)]
    )
    app[CALLER_KEY] = auth
    app[REGISTRY_KEY] = registry

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "service": service})

    async def readyz(_: web.Request) -> web.Response:
        if ready is not None and not ready():
            return json_error(503, "not ready")
        return web.json_response({"status": "ready", "service": service})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


def registry_of(app: web.Application) -> CollectorRegistry:
    """The app's own metrics registry (one per app, so several services share a process)."""
    return app[REGISTRY_KEY]


class BackgroundService:
    """Runs an aiohttp app on its own event loop in a daemon thread.

    ``start()`` returns the bound port (pass port 0 for a free one); ``stop()`` shuts it down.
    """

    def __init__(
        self, app_factory: Callable[[], web.Application], host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._factory = app_factory
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> int:
        self._thread = threading.Thread(target=self._run, name="lattice-service", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("service did not start in time")
        if self._error is not None:
            raise self._error
        return self.port

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._started.set()
            return
        self._started.set()
        loop.run_forever()
        loop.run_until_complete(self._cleanup())
        loop.close()

    async def _serve(self) -> None:
        self._runner = web.AppRunner(self._factory(), handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        server = site._server
        if server is not None and server.sockets:  # port 0 → the port the OS chose
            self.port = server.sockets[0].getsockname()[1]

    async def _cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._loop = self._thread = None


def serve_forever(app: web.Application, host: str, port: int) -> None:
    """Run a service in the foreground until SIGINT/SIGTERM (the `... serve` commands)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    web.run_app(app, host=host, port=port, access_log=None, print=lambda *_: None)
