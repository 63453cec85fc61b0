"""Access control, route by route: every route of every service x every kind of caller.

The routes come from the services' own routers (``app.router.routes()``), so an endpoint added
later is covered without touching this file. Each service first holds real job data (a running
round, a KV value, a committed checkpoint); then every caller that must be refused sends a
request that *would* change that data if the service let it through, and the test checks the
status (401 or 403), that the answer carries none of the job's data, and that the data the
admin sees is unchanged. The callers that may pass must get through, and between them must see
every secret, so the refusals above are not vacuous. Tokens never reach the services' logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from aiohttp import web

from lattice.checkpoint.server import create_app as checkpoint_app
from lattice.common.auth import job_token
from lattice.common.http import CALLER_KEY, BackgroundService
from lattice.operator.local.api import create_app as local_api_app
from lattice.operator.local.plane import ControlPlane, PlaneConfig
from lattice.rendezvous.server import create_app as rendezvous_app

JOB = "job-a"
OTHER_JOB = "job-b"
OPEN = {"/healthz", "/readyz", "/metrics"}  # open by design (aggregates only, no job names)
TIMEOUT = httpx.Timeout(10.0)

# Job data that only the job's own token and the admin may ever see.
TAG = secrets.token_hex(4)
NODE_A, NODE_B = f"node-a-{TAG}", f"node-b-{TAG}"
ADDR_A, ADDR_B = f"host-a-{TAG}.internal", f"host-b-{TAG}.internal"
JOIN_A = f"ja{TAG}"
KV_KEY = f"kv-{TAG}"
KV_VALUE = f"KV-SECRET-{TAG}".encode()
STEP = 7
SHARD = f"shard-{TAG}"
PAYLOAD = f"PAYLOAD-SECRET-{TAG}".encode() * 64
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
META = f"META-SECRET-{TAG}"
INTRUDER = f"intruder-{TAG}"


@dataclass(frozen=True)
class Caller:
    name: str
    header: str | None  # the Authorization header sent, None: no header at all
    expect: str  # "401", "403" or "pass"


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    json: Any = None
    content: bytes | None = None


@dataclass
class Target:
    """One running service with job data, and how to poke at each of its routes."""

    name: str
    app: web.Application
    url: str
    fill: dict[str, str]  # path variable → value that names the job's real data
    calls: dict[tuple[str, str], Callable[[str], Call]]  # (method, route) → state-changing call
    admin_only: set[tuple[str, str]]
    snapshot: Callable[[], Any]  # what the admin sees
    secrets: list[bytes]


def _callers(admin: str, job: str) -> tuple[list[Caller], list[str]]:
    """Every kind of caller for ``job``'s routes, and every token string among them."""
    right = job_token(admin, job)
    revoked = job_token(admin, job, ttl_s=3600)
    wrong = "wrong-" + secrets.token_urlsafe(24)
    callers = [
        Caller("no token", None, "401"),
        Caller("malformed header: Basic scheme", f"Basic {admin}", "401"),
        Caller("malformed header: no scheme", admin, "401"),
        Caller("malformed header: empty bearer", "Bearer", "401"),
        Caller("malformed header: garbage", "Bearer  ~~ ;; ==", "401"),
        Caller("wrong token", f"Bearer {wrong}", "401"),
        Caller("job token of another install", f"Bearer {job_token(wrong, job)}", "401"),
        Caller("another job's token", f"Bearer {job_token(admin, OTHER_JOB)}", "403"),
        Caller("expired job token", f"Bearer {job_token(admin, job, ttl_s=-60)}", "401"),
        Caller("revoked job token", f"Bearer {revoked}", "401"),
        Caller("right job token", f"Bearer {right}", "pass"),
        Caller("admin token", f"Bearer {admin}", "pass"),
    ]
    tokens = [admin, right, revoked, wrong, job_token(wrong, job), job_token(admin, OTHER_JOB)]
    return callers, tokens


def _routes(app: web.Application) -> list[tuple[str, str]]:
    found = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource}
    assert found, "the app has no routes"
    return sorted(found)


def _path(route: str, fill: dict[str, str]) -> str:
    def value(m: re.Match[str]) -> str:
        return quote(fill.get(m.group(1), "x1"), safe="")

    return re.sub(r"\{(\w+)(?::[^}]*)?\}", value, route)


def _send(client: httpx.Client, target: Target, call: Call, header: str | None) -> httpx.Response:
    headers = {} if header is None else {"Authorization": header}
    return client.request(
        call.method,
        target.url + call.path,
        params=call.params,
        json=call.json,
        content=call.content,
        headers=headers,
    )


def _leaked(response: httpx.Response, secret_values: list[bytes]) -> list[bytes]:
    seen = response.content + json.dumps(dict(response.headers)).encode()
    return [s for s in secret_values if s in seen]


def run_matrix(
    client: httpx.Client, target: Target, callers: list[Caller], tokens: list[str]
) -> dict[str, int]:
    """Every route x caller; returns counts of cases by outcome. No answer, to any caller,
    ever carries a token (not even the one the caller sent)."""
    never = [t.encode() for t in tokens]
    counts = {"denied": 0, "open": 0, "passed": 0}
    routes = _routes(target.app)
    passing: list[tuple[str, str, Caller]] = []
    before = target.snapshot()
    for method, route in routes:
        make = target.calls.get((method, route))
        call = make(method) if make else Call(method, _path(route, target.fill), json={})
        for who in callers:
            where = f"{target.name} {method} {route} as {who.name}"
            if route in OPEN:
                r = _send(client, target, call, who.header)
                assert r.status_code == 200, where
                assert not _leaked(r, [*target.secrets, *never, JOB.encode()]), where
                counts["open"] += 1
                continue
            expect = who.expect
            if (
                expect == "pass"
                and (method, route) in target.admin_only
                and "admin" not in who.name
            ):
                expect = "403"
            if expect == "pass":
                passing.append((method, route, who))
                continue
            r = _send(client, target, call, who.header)
            assert r.status_code == int(expect), f"{where}: {r.status_code} {r.text[:200]}"
            if method != "HEAD":
                assert "error" in r.json(), where
            leaked = _leaked(r, target.secrets + never)
            assert not leaked, f"{where} leaked {leaked}"
            assert target.snapshot() == before, f"{where} changed the job's state"
            counts["denied"] += 1

    # The callers that may pass: reads first (between them they must see every secret), then
    # the state-changing calls, which must get past auth and never fail inside the service.
    seen = b""
    reads = [p for p in passing if p[0] in ("GET", "HEAD")]
    writes = [p for p in passing if p[0] not in ("GET", "HEAD")]
    for method, route, who in reads + writes:
        make = target.calls.get((method, route))
        call = make(method) if make else Call(method, _path(route, target.fill), json={})
        r = _send(client, target, call, who.header)
        where = f"{target.name} {method} {route} as {who.name}"
        assert r.status_code not in (401, 403), f"{where}: {r.status_code} {r.text[:200]}"
        assert r.status_code < 500, f"{where}: {r.status_code} {r.text[:200]}"
        assert not _leaked(r, never), f"{where} answered with a token"
        if method == "GET":
            assert r.status_code == 200, f"{where}: {r.status_code} {r.text[:200]}"
            seen += r.content + json.dumps(dict(r.headers)).encode()
        counts["passed"] += 1
    missing = [s for s in target.secrets if s not in seen]
    assert not missing, f"{target.name}: allowed reads never showed {missing} (vacuous test)"
    return counts


def _serve(factory: Callable[[], web.Application]) -> tuple[BackgroundService, web.Application]:
    made: list[web.Application] = []

    def build() -> web.Application:
        made.append(factory())
        return made[-1]

    svc = BackgroundService(build)
    svc.start()
    return svc, made[0]


# ---------------------------------------------------------------------- rendezvous


@contextmanager
def _rendezvous_target(client: httpx.Client, admin: str) -> Iterator[Target]:
    svc, app = _serve(lambda: rendezvous_app(admin, settle_s=0.0, lease_s=600.0))
    url = f"http://{svc.endpoint}"
    h = {"Authorization": f"Bearer {admin}"}
    base = f"{url}/v1/jobs/{JOB}"
    join = {"nproc": 1, "port": 29500, "min_nodes": 2, "max_nodes": 2}
    a = {**join, "node_id": NODE_A, "join_id": JOIN_A, "addr": ADDR_A}
    b = {**join, "node_id": NODE_B, "join_id": f"jb{TAG}", "addr": ADDR_B}
    assert client.post(f"{base}/join", json=a, headers=h).json()["status"] == "waiting"
    assert client.post(f"{base}/join", json=b, headers=h).json()["status"] == "ready"
    ready = client.post(f"{base}/join", json=a, headers=h).json()
    assert ready["status"] == "ready"
    gen = ready["round"]["generation"]
    assert client.put(f"{base}/kv/{KV_KEY}", content=KV_VALUE, headers=h).status_code == 200

    def snapshot() -> Any:
        status = client.get(base, headers=h).json()
        for w in status["waiting"]:
            w.pop("waiting_s")
        kv = client.get(f"{base}/kv/{KV_KEY}", headers=h)
        other = client.get(f"{url}/v1/jobs/{OTHER_JOB}", headers=h).json()
        return status, kv.status_code, kv.content, other

    route = "/v1/jobs/{job}"
    fill = {"job": JOB, "generation": str(gen), "key": KV_KEY}
    intruder = {"node_id": INTRUDER, "nproc": 1, "addr": "10.6.6.6", "port": 2000}

    def post(path: str, body: Any) -> Callable[[str], Call]:
        return lambda method: Call(method, _path(route + path, fill), json=body)

    calls: dict[tuple[str, str], Callable[[str], Call]] = {
        ("POST", route + "/join"): post(
            "/join", {**intruder, "join_id": "ij", "min_nodes": 2, "max_nodes": 3}
        ),
        ("POST", route + "/withdraw"): post("/withdraw", {"node_id": NODE_A, "join_id": JOIN_A}),
        ("POST", route + "/register"): post(
            "/register",
            {
                "node_id": INTRUDER,
                "generation": gen + 1000,
                "min_nodes": 1,
                "max_nodes": 3,
                "members": [{**intruder, "rank": 0}],
            },
        ),
        ("POST", route + "/heartbeat"): post("/heartbeat", {"node_id": NODE_A}),
        ("POST", route + "/leave"): post("/leave", {"node_id": NODE_A}),
        ("POST", route + "/rounds/{generation}/failure"): post(
            "/rounds/{generation}/failure", {"node_id": NODE_A, "detail": "intruder"}
        ),
        ("POST", route + "/rounds/{generation}/succeeded"): post(
            "/rounds/{generation}/succeeded", {"node_id": NODE_A}
        ),
        ("PUT", route + "/kv/{key}"): lambda m: Call(
            m, _path(route + "/kv/{key}", fill), content=b"intruder"
        ),
        ("PUT", route + "/target"): post("/target", {"size": 1}),
    }
    for method in ("GET", "HEAD"):
        calls[(method, route + "/rounds/{generation}/end")] = lambda m: Call(
            m, _path(route + "/rounds/{generation}/end", fill), {"wait_s": "0", "node_id": NODE_A}
        )
        calls[(method, route + "/kv/{key}")] = lambda m: Call(
            m, _path(route + "/kv/{key}", fill), {"wait_s": "0"}
        )
    try:
        yield Target(
            name="rendezvous",
            app=app,
            url=url,
            fill=fill,
            calls=calls,
            admin_only={("PUT", route + "/target")},
            snapshot=snapshot,
            secrets=[NODE_A.encode(), NODE_B.encode(), ADDR_A.encode(), ADDR_B.encode(), KV_VALUE],
        )
    finally:
        svc.stop()


# ---------------------------------------------------------------------- checkpoint


def _tree(root: Path) -> list[tuple[str, int, str]]:
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in root.rglob("*")
        if p.is_file()
    )


@contextmanager
def _checkpoint_target(client: httpx.Client, admin: str, root: Path) -> Iterator[Target]:
    data = root / "data"
    svc, app = _serve(lambda: checkpoint_app(admin, str(data), keep=3))
    url = f"http://{svc.endpoint}"
    h = {"Authorization": f"Bearer {admin}"}
    base = f"{url}/v1/jobs/{JOB}/checkpoints"
    put = client.put(f"{base}/{STEP}/shards/{SHARD}", content=PAYLOAD, headers=h)
    assert put.status_code == 201
    body = {"shards": {SHARD: put.json()}, "meta": {"note": META}}
    assert client.post(f"{base}/{STEP}/commit", json=body, headers=h).status_code == 201

    def snapshot() -> Any:
        listed = client.get(base, headers=h).json()
        other = client.get(f"{url}/v1/jobs/{OTHER_JOB}/checkpoints", headers=h).json()
        return listed, other, _tree(root)  # every file under the parent of the data dir

    route = "/v1/jobs/{job}/checkpoints"
    fill = {"job": JOB, "step": str(STEP), "name": SHARD}
    commit = {"shards": {SHARD: {"sha256": PAYLOAD_SHA, "size": len(PAYLOAD)}}, "meta": {"x": 1}}
    calls: dict[tuple[str, str], Callable[[str], Call]] = {
        ("PUT", route + "/{step}/shards/{name}"): lambda m: Call(
            m, _path(route + "/{step}/shards/{name}", fill), content=b"intruder bytes"
        ),
        ("POST", route + "/{step}/commit"): lambda m: Call(
            m, _path(route + "/{step}/commit", fill), json=commit
        ),
    }
    try:
        yield Target(
            name="checkpoint",
            app=app,
            url=url,
            fill=fill,
            calls=calls,
            admin_only=set(),
            snapshot=snapshot,
            secrets=[PAYLOAD[:64], PAYLOAD_SHA.encode(), META.encode()],
        )
    finally:
        svc.stop()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=TIMEOUT) as client:
        yield client


@pytest.mark.parametrize("service", ["rendezvous", "checkpoint"])
def test_every_route_times_every_caller(
    service: str,
    http: httpx.Client,
    admin_token: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    record_property: Callable[[str, object], None],
) -> None:
    caplog.set_level(logging.WARNING, logger="httpcore")  # the client library, not a service
    caplog.set_level(logging.DEBUG)  # (second: set_level also sets the handler's level)
    if service == "rendezvous":
        serving = _rendezvous_target(http, admin_token)
    else:
        serving = _checkpoint_target(http, admin_token, tmp_path)
    with serving as target:
        callers, tokens = _callers(admin_token, JOB)
        revoked = callers[[c.name for c in callers].index("revoked job token")]
        assert revoked.header is not None
        target.app[CALLER_KEY].revoke(revoked.header.removeprefix("Bearer "))
        routes = _routes(target.app)
        job_routes = [r for r in routes if "{job}" in r[1]]
        assert len(job_routes) >= 5 and {r[1] for r in routes} >= OPEN
        assert not [r for r in routes if r[1] not in OPEN and "{job}" not in r[1]], (
            "a route outside /v1/jobs/{job}: add its expectations to this test"
        )
        counts = run_matrix(http, target, callers, tokens)
    cases = sum(counts.values())
    assert cases == len(routes) * len(callers)
    record_property("cases", cases)
    print(f"{service}: {len(routes)} routes x {len(callers)} callers = {cases} cases {counts}")

    # Tokens never reach the logs: every record of the services (and asyncio, aiohttp) at DEBUG.
    service_records = [r for r in caplog.records if r.name.startswith(("lattice", "aiohttp"))]
    assert service_records, "the service logged nothing: the log check would be vacuous"
    logged = (
        "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
        + caplog.text
    )
    for token in tokens:
        assert token not in logged, f"a token reached the {service} logs"


# ---------------------------------------------------------------------- local control plane

EXAMPLE = """
apiVersion: exabits.ai/v1
kind: TrainingJob
metadata: {{name: {name}, namespace: lattice}}
spec:
  minSize: 1
  maxSize: 2
  replicaSpecs:
    template:
      spec:
        containers:
          - name: trainingjob
            image: exabits/lattice-resnet
            command: ["python", "main.py", "{arg}"]
"""


def test_local_control_plane_api_is_admin_only(
    http: httpx.Client, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    plane = ControlPlane(PlaneConfig(home=tmp_path / "home", slots=2))
    svc, app = _serve(lambda: local_api_app(plane))
    url = f"http://{svc.endpoint}"
    admin = plane.token
    h = {"Authorization": f"Bearer {admin}"}
    secret = f"ARG-SECRET-{TAG}"
    try:
        doc = EXAMPLE.format(name="example-job", arg=secret)
        assert http.post(f"{url}/v1/apply", content=doc, headers=h).status_code == 200

        def snapshot() -> Any:
            return (
                http.get(f"{url}/v1/trainingjobs", headers=h).json(),
                http.get(f"{url}/v1/slots", headers=h).json(),
            )

        before = snapshot()
        assert secret in json.dumps(before)
        fill = {"ns": "lattice", "name": "example-job"}
        bodies = {
            ("POST", "/v1/apply"): EXAMPLE.format(name="intruder-job", arg="x").encode(),
            ("PUT", "/v1/slots"): b'{"slots": 0}',
        }
        wrong = "wrong-" + secrets.token_urlsafe(24)
        callers = [
            Caller("no token", None, "401"),
            Caller("malformed header", f"Basic {admin}", "401"),
            Caller("wrong token", f"Bearer {wrong}", "401"),
            Caller("job token", f"Bearer {job_token(admin, 'example-job')}", "403"),
            Caller("namespace job token", f"Bearer {job_token(admin, 'lattice')}", "403"),
            Caller("expired job token", f"Bearer {job_token(admin, 'x', ttl_s=-60)}", "401"),
            Caller("admin token", f"Bearer {admin}", "pass"),
        ]
        routes = _routes(app)
        cases = 0
        allowed: list[tuple[str, str]] = []
        for method, route in routes:
            path = _path(route, fill)
            body = bodies.get((method, route), b"{}" if method in ("POST", "PUT") else None)
            for who in callers:
                where = f"local {method} {route} as {who.name}"
                headers = {} if who.header is None else {"Authorization": who.header}
                if route in OPEN or who.expect == "pass":
                    if route not in OPEN:
                        allowed.append((method, route))
                        continue
                    r = http.request(method, url + path, content=body, headers=headers)
                    assert r.status_code == 200, where
                    assert secret.encode() not in r.content and admin.encode() not in r.content, (
                        where
                    )
                else:
                    r = http.request(method, url + path, content=body, headers=headers)
                    assert r.status_code == int(who.expect), f"{where}: {r.status_code}"
                    assert secret.encode() not in r.content and admin.encode() not in r.content, (
                        where
                    )
                    assert snapshot() == before, f"{where} changed the control plane's state"
                cases += 1
        for method, route in sorted(allowed, key=lambda r: r[0] == "DELETE"):
            body = bodies.get((method, route), b"{}" if method in ("POST", "PUT") else None)
            r = http.request(method, url + _path(route, fill), content=body, headers=h)
            assert r.status_code not in (401, 403) and r.status_code < 500, (method, route)
            cases += 1
        assert cases == len(routes) * len(callers)
        record_property("cases", cases)
        print(f"local control plane: {len(routes)} routes x {len(callers)} callers = {cases}")
    finally:
        svc.stop()
        plane.store.close()
