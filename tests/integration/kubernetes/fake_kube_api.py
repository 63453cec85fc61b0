"""A stateful fake Kubernetes API server for the operator's tests: real HTTP on loopback.

It keeps objects in memory and behaves like the API server where the operator depends on it:
CRUD for pods, services, secrets, events, leases, nodes and TrainingJobs of both groups with
their ``/status`` subresource; list and watch (``?watch=true``, resourceVersion, 410 Gone after
`compact`); label selectors; resourceVersion conflicts (409 on a stale update, or when a
CustomResource update carries none); 404; finalizers and deletionTimestamp; owner references
with background garbage collection; bearer-token auth.

A small built-in "scheduler + kubelet" makes pods behave: a new pod is bound to a Ready node
with room for its requests (else it stays Pending with an Unschedulable condition) and runs;
a graceful delete leaves the pod terminating for ``stop_delay`` seconds; deleting a node
removes the pods bound to it. Tests drive the rest (`fail_pod`, `add_node`, …).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from lattice.api.pod import quantity_value

Obj = dict[str, Any]
Key = tuple[str, str, str, str]  # (api, plural, namespace, name); namespace "" if cluster-wide


@dataclass(frozen=True)
class Kind:
    kind: str
    namespaced: bool = True
    status_subresource: bool = False
    custom: bool = False  # CustomResources: updates must carry a resourceVersion


KINDS: dict[tuple[str, str], Kind] = {
    ("v1", "pods"): Kind("Pod"),
    ("v1", "services"): Kind("Service"),
    ("v1", "secrets"): Kind("Secret"),
    ("v1", "events"): Kind("Event"),
    ("v1", "nodes"): Kind("Node", namespaced=False),
    ("coordination.k8s.io/v1", "leases"): Kind("Lease"),
    ("exabits.ai/v1", "trainingjobs"): Kind("TrainingJob", status_subresource=True, custom=True),
    ("breezeml.ai/v1", "trainingjobs"): Kind("TrainingJob", status_subresource=True, custom=True),
}
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiFailure(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> Obj:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


# -- label selectors ----------------------------------------------------------------------


def _split_terms(text: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        terms.append(current.strip())
    return terms


def parse_selector(text: str | None) -> Callable[[dict[str, str]], bool]:
    """``a=b,c!=d,e,!f,g in (x,y),h notin (z)`` → a predicate over labels."""
    checks: list[Callable[[dict[str, str]], bool]] = []
    for term in _split_terms(text or ""):
        m = re.match(r"^([^\s!=]+)\s+(in|notin)\s+\((.*)\)$", term)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if op == "in":
                checks.append(lambda lb, k=key, vs=values: lb.get(k) in vs)
            else:
                checks.append(lambda lb, k=key, vs=values: lb.get(k) not in vs)
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            checks.append(lambda lb, k=key, v=value: lb.get(k) != v)
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            checks.append(lambda lb, k=key, v=value: lb.get(k) == v)
        elif term.startswith("!"):
            absent = term[1:].strip()
            checks.append(lambda lb, k=absent: k not in lb)
        else:
            checks.append(lambda lb, k=term: k in lb)
    return lambda labels: all(c(labels) for c in checks)


def _labels(obj: Obj) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})


# -- the server ---------------------------------------------------------------------------


@dataclass
class Request:
    verb: str  # get list watch create update delete
    api: str
    resource: str  # plural, or plural/subresource
    namespace: str


class FakeKube:
    """The fake API server. Run it in the test's event loop: ``await start()``/``stop()``."""

    def __init__(self, token: str = "fake-admin-token", *, stop_delay: float = 0.05) -> None:
        self.token = token
        self.stop_delay = stop_delay
        self.objects: dict[Key, Obj] = {}
        self.rv = 1
        self.floor = 0  # watches from at or below this resourceVersion get 410 Gone
        self.history: list[tuple[int, str, Key, Obj]] = []
        self.requests: list[Request] = []
        self.deletions: list[tuple[str, str, str, int | None]] = []  # plural, ns, name, grace
        self.kubelet = True
        self._conflicts: dict[tuple[str, str], int] = {}
        self._changed = asyncio.Event()
        self._closing = False
        self._epoch = 0  # bumped by drop_watches: open watch streams end
        self.gone_sent = 0  # 410 Gone answers to watches
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._closing = True
        self._notify()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "fake", "namespace": namespace},
                }
            ],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # -- helpers for tests ---------------------------------------------------------------

    def list(
        self, api: str, plural: str, namespace: str | None = None, labels: str | None = None
    ) -> list[Obj]:
        match = parse_selector(labels)
        return [
            copy.deepcopy(o)
            for (a, p, ns, _), o in sorted(self.objects.items())
            if a == api
            and p == plural
            and (namespace is None or ns == namespace)
            and match(_labels(o))
        ]

    def get(self, api: str, plural: str, namespace: str, name: str) -> Obj | None:
        obj = self.objects.get((api, plural, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def pods(self, namespace: str | None = None, labels: str | None = None) -> list[Obj]:
        return self.list("v1", "pods", namespace, labels)

    def create(self, api: str, plural: str, obj: Obj) -> Obj:
        """Create as a client would (e.g. `kubectl apply` of a TrainingJob)."""
        ns = (obj.get("metadata") or {}).get("namespace", "default")
        return copy.deepcopy(
            self._create(
                api, plural, ns if KINDS[(api, plural)].namespaced else "", copy.deepcopy(obj)
            )
        )

    def delete(self, api: str, plural: str, namespace: str, name: str) -> None:
        self._delete((api, plural, namespace, name), None)

    def add_node(self, name: str, allocatable: dict[str, str], *, ready: bool = True) -> Obj:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {},
            "status": {
                "allocatable": dict(allocatable),
                "capacity": dict(allocatable),
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            },
        }
        return self._create("v1", "nodes", "", node)

    def remove_node(self, name: str) -> None:
        self._delete(("v1", "nodes", "", name), 0)
        for key, pod in list(self.objects.items()):
            if key[1] == "pods" and (pod.get("spec") or {}).get("nodeName") == name:
                self._remove(key)  # the pod garbage collector: orphaned pods go at once

    def fail_pod(
        self,
        namespace: str,
        name: str,
        exit_code: int = 1,
        reason: str = "Error",
        message: str = "",
    ) -> None:
        self._finish_pod(namespace, name, "Failed", exit_code, reason, message)

    def succeed_pod(self, namespace: str, name: str) -> None:
        self._finish_pod(namespace, name, "Succeeded", 0, "Completed", "")

    def _finish_pod(
        self, namespace: str, name: str, phase: str, code: int, reason: str, message: str
    ) -> None:
        key = ("v1", "pods", namespace, name)
        pod = copy.deepcopy(self.objects[key])
        terminated = {
            "exitCode": code,
            "reason": reason,
            "message": message,
            "finishedAt": now_text(),
        }
        pod["status"]["phase"] = phase
        pod["status"]["containerStatuses"] = [
            {
                "name": c["name"],
                "ready": False,
                "restartCount": 0,
                "state": {"terminated": terminated},
            }
            for c in pod["spec"]["containers"]
        ]
        self._store(key, pod, "MODIFIED")
        self._kubelet_pass()

    def inject_conflicts(self, api: str, resource: str, times: int) -> None:
        """The next ``times`` updates of ``resource`` (e.g. "trainingjobs/status") race with
        another writer: the object changes just before the update, so the update is stale."""
        self._conflicts[(api, resource)] = times

    def compact(self) -> None:
        """Forget the change history: watches resuming from an older version get 410 Gone."""
        self.floor = self.rv
        self.history.clear()
        self._notify()

    def drop_watches(self) -> None:
        """End every open watch stream (like an API server restart or a load balancer)."""
        self._epoch += 1
        self._notify()

    def used(self) -> set[tuple[str, str, str]]:
        """(verb, api group, resource) of every request served."""
        return {(r.verb, r.api.rpartition("/")[0], r.resource) for r in self.requests}

    # -- storage -------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _store(self, key: Key, obj: Obj, event: str) -> Obj:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.objects[key] = obj
        self.history.append((self.rv, event, key, copy.deepcopy(obj)))
        self._notify()
        return obj

    def _remove(self, key: Key) -> None:
        obj = self.objects.pop(key, None)
        if obj is None:
            return
        self.rv += 1
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = str(self.rv)
        self.history.append((self.rv, "DELETED", key, gone))
        self._notify()
        self._collect_garbage()
        if key[1] == "pods":
            self._kubelet_pass()  # room for pending pods

    def _collect_garbage(self) -> None:
        """Background GC: delete objects whose owners are all gone."""
        uids = {o["metadata"].get("uid") for o in self.objects.values()}
        for key, obj in list(self.objects.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            orphaned = refs and all(ref.get("uid") not in uids for ref in refs)
            if orphaned and key in self.objects and not obj["metadata"].get("deletionTimestamp"):
                self._delete(key, None)

    # -- HTTP ----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(
                ApiFailure(401, "Unauthorized", "Unauthorized").status(), status=401
            )
        try:
            api, plural, namespace, name, sub = self._route(request.path)
            kind = KINDS.get((api, plural))
            if kind is None:
                raise ApiFailure(404, "NotFound", f"the server could not find {request.path}")
            resource = f"{plural}/{sub}" if sub else plural
            method = request.method
            watch = request.query.get("watch") in ("true", "1")
            verb = {
                "GET": "get" if name else ("watch" if watch else "list"),
                "POST": "create",
                "PUT": "update",
                "PATCH": "patch",
                "DELETE": "delete",
            }[method]
            self.requests.append(Request(verb, api, resource, namespace))
            if verb == "watch":
                return await self._watch(request, api, plural, namespace)
            if verb == "list":
                return web.json_response(
                    self._list_body(
                        api, plural, kind, namespace, request.query.get("labelSelector")
                    )
                )
            if sub and sub != "status":
                raise ApiFailure(404, "NotFound", f"no subresource {sub}")
            if sub and not kind.status_subresource:
                raise ApiFailure(404, "NotFound", f"{plural} has no status subresource")
            ns = namespace if kind.namespaced else ""
            if verb == "create":
                if name:
                    raise ApiFailure(405, "MethodNotAllowed", "POST to a collection")
                body = await request.json()
                return web.json_response(self._create(api, plural, ns, body), status=201)
            key = (api, plural, ns, name)
            if verb == "get":
                return web.json_response(self._must(key))
            if verb == "update":
                return web.json_response(self._update(key, await request.json(), sub, kind))
            if verb == "delete":
                options = await request.json() if request.can_read_body else {}
                grace = options.get("gracePeriodSeconds", request.query.get("gracePeriodSeconds"))
                self._must(key)
                self.deletions.append((plural, ns, name, None if grace is None else int(grace)))
                return web.json_response(self._delete(key, None if grace is None else int(grace)))
            raise ApiFailure(405, "MethodNotAllowed", f"{method} is not supported by the fake")
        except ApiFailure as exc:
            return web.json_response(exc.status(), status=exc.code)
        except ConnectionResetError:  # the client went away (e.g. at shutdown)
            return web.Response(status=499)

    def _route(self, path: str) -> tuple[str, str, str, str, str]:
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            api, rest = "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            api, rest = f"{parts[1]}/{parts[2]}", parts[3:]
        else:
            raise ApiFailure(404, "NotFound", f"the server could not find {path}")
        namespace = ""
        if len(rest) >= 2 and rest[0] == "namespaces" and len(rest) > 2:
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise ApiFailure(404, "NotFound", f"the server could not find {path}")
        plural = rest[0]
        name = rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        return api, plural, namespace, name, sub

    def _must(self, key: Key) -> Obj:
        obj = self.objects.get(key)
        if obj is None:
            raise ApiFailure(404, "NotFound", f'{key[1]} "{key[3]}" not found')
        return obj

    def _list_body(
        self, api: str, plural: str, kind: Kind, namespace: str, labels: str | None
    ) -> Obj:
        match = parse_selector(labels)
        items = []
        for (a, p, ns, _), obj in sorted(self.objects.items()):
            in_scope = a == api and p == plural and (not namespace or ns == namespace)
            if in_scope and match(_labels(obj)):
                item = copy.deepcopy(obj)
                item.pop("kind", None)  # like the real server: list items carry no kind
                item.pop("apiVersion", None)
                items.append(item)
        return {
            "kind": f"{kind.kind}List",
            "apiVersion": api,
            "metadata": {"resourceVersion": str(self.rv)},
            "items": items,
        }

    # -- verbs ---------------------------------------------------------------------------

    def _validate(self, plural: str, obj: Obj) -> None:
        meta = obj["metadata"]
        for k, v in (meta.get("labels") or {}).items():
            if not isinstance(v, str) or len(v) > 63 or not _LABEL_VALUE.match(v):
                raise ApiFailure(422, "Invalid", f"metadata.labels[{k}]: invalid value {v!r}")
        for ref in meta.get("ownerReferences") or []:
            if not all(ref.get(f) for f in ("apiVersion", "kind", "name", "uid")):
                raise ApiFailure(422, "Invalid", f"metadata.ownerReferences: incomplete {ref}")
        if plural == "pods":
            spec = obj.get("spec") or {}
            containers = spec.get("containers") or []
            if not containers or not all(c.get("name") and c.get("image") for c in containers):
                raise ApiFailure(422, "Invalid", "spec.containers: name and image are required")
            for field in ("hostname", "subdomain"):
                value = spec.get(field)
                if value is not None and (len(value) > 63 or not _DNS_LABEL.match(value)):
                    raise ApiFailure(422, "Invalid", f"spec.{field}: {value!r} is not a label")
        if plural == "services":
            name = meta["name"]
            if len(name) > 63 or not re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", name):
                raise ApiFailure(422, "Invalid", f"metadata.name: {name!r} is not DNS-1035")
        if plural == "events" and not (obj.get("involvedObject") or {}).get("name"):
            raise ApiFailure(422, "Invalid", "involvedObject is required")

    def _create(self, api: str, plural: str, namespace: str, obj: Obj) -> Obj:
        kind = KINDS[(api, plural)]
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise ApiFailure(422, "Invalid", "metadata.name: Required value")
        if kind.namespaced:
            if meta.get("namespace") not in (None, namespace):
                raise ApiFailure(
                    400,
                    "BadRequest",
                    "the namespace of the object does not match the namespace of the request",
                )
            meta["namespace"] = namespace
        key = (api, plural, namespace, meta["name"])
        if key in self.objects:
            raise ApiFailure(409, "AlreadyExists", f'{plural} "{meta["name"]}" already exists')
        self._validate(plural, obj)
        obj["apiVersion"], obj["kind"] = api, kind.kind
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_text()
        for f in ("resourceVersion", "deletionTimestamp", "generation"):
            meta.pop(f, None)
        if kind.custom:
            meta["generation"] = 1
        if kind.status_subresource:
            obj.pop("status", None)
        if plural == "secrets" and "stringData" in obj:
            data = obj.setdefault("data", {})
            for k, v in obj.pop("stringData").items():
                data[k] = base64.b64encode(str(v).encode()).decode()
        if plural == "pods":
            obj.setdefault("spec", {}).setdefault("terminationGracePeriodSeconds", 30)
            obj["status"] = {"phase": "Pending"}
        stored = self._store(key, obj, "ADDED")
        if plural in ("pods", "nodes"):
            self._kubelet_pass()
        return copy.deepcopy(stored)

    def _update(self, key: Key, body: Obj, sub: str, kind: Kind) -> Obj:
        current = self._must(key)
        api, plural = key[0], key[1]
        resource = f"{plural}/{sub}" if sub else plural
        pending = self._conflicts.get((api, resource), 0)
        if pending:
            self._conflicts[(api, resource)] = pending - 1
            bumped = copy.deepcopy(current)
            notes = bumped["metadata"].setdefault("annotations", {})
            notes["fake.lattice/concurrent-writes"] = str(
                int(notes.get("fake.lattice/concurrent-writes", "0")) + 1
            )
            current = self._store(key, bumped, "MODIFIED")
        meta = body.get("metadata") or {}
        rv = meta.get("resourceVersion")
        if not rv and kind.custom:
            raise ApiFailure(
                422,
                "Invalid",
                "metadata.resourceVersion: Invalid value: 0: must be specified for an update",
            )
        if rv and rv != current["metadata"]["resourceVersion"]:
            raise ApiFailure(
                409,
                "Conflict",
                f"Operation cannot be fulfilled on {plural} "
                f'"{key[3]}": the object has been modified; please apply your '
                "changes to the latest version and try again",
            )
        if meta.get("uid") and meta["uid"] != current["metadata"]["uid"]:
            raise ApiFailure(409, "Conflict", "Precondition failed: UID mismatch")
        if sub == "status":
            new = copy.deepcopy(current)
            new["status"] = copy.deepcopy(body.get("status"))
            return copy.deepcopy(self._store(key, new, "MODIFIED"))
        self._validate(plural, {**body, "metadata": {**current["metadata"], **meta}})
        if plural == "services":
            old_ip = (current.get("spec") or {}).get("clusterIP")
            if (body.get("spec") or {}).get("clusterIP", old_ip) != old_ip:
                raise ApiFailure(422, "Invalid", "spec.clusterIP: field is immutable")
        old_fin = set(current["metadata"].get("finalizers") or [])
        new_fin = set(meta.get("finalizers") or [])
        deleting = bool(current["metadata"].get("deletionTimestamp"))
        if deleting and new_fin - old_fin:
            raise ApiFailure(
                422, "Forbidden", "no new finalizers can be added if the object is being deleted"
            )
        # A PUT replaces the object; the server keeps what it manages (uid, timestamps …) and,
        # with a status subresource, the status.
        new = {k: copy.deepcopy(v) for k, v in body.items() if k not in ("metadata", "status")}
        new["apiVersion"], new["kind"] = current["apiVersion"], current["kind"]
        new["metadata"] = copy.deepcopy(current["metadata"])
        for field in ("labels", "annotations", "finalizers", "ownerReferences"):
            if field in meta:
                new["metadata"][field] = copy.deepcopy(meta[field])
            else:
                new["metadata"].pop(field, None)
        if kind.status_subresource:
            if "status" in current:
                new["status"] = copy.deepcopy(current["status"])
        elif "status" in body or "status" in current:
            new["status"] = copy.deepcopy(body.get("status", current.get("status")))
        if kind.custom and new.get("spec") != current.get("spec"):
            new["metadata"]["generation"] = int(current["metadata"].get("generation", 1)) + 1
        if deleting and not new_fin:
            self._remove(key)
            return new
        return copy.deepcopy(self._store(key, new, "MODIFIED"))

    def _delete(self, key: Key, grace: int | None) -> Obj:
        obj = self.objects.get(key)
        if obj is None:
            return {}
        meta = obj["metadata"]
        if key[1] == "pods" and grace is None:
            grace = int((obj.get("spec") or {}).get("terminationGracePeriodSeconds", 30))
        bound = bool((obj.get("spec") or {}).get("nodeName"))
        running = (obj.get("status") or {}).get("phase") in ("Pending", "Running")
        terminating = key[1] == "pods" and bound and running and grace
        if meta.get("finalizers") or terminating:
            if not meta.get("deletionTimestamp"):
                new = copy.deepcopy(obj)
                new["metadata"]["deletionTimestamp"] = now_text()
                new["metadata"]["deletionGracePeriodSeconds"] = grace or 0
                obj = self._store(key, new, "MODIFIED")
                if terminating and not meta.get("finalizers"):
                    asyncio.get_running_loop().call_later(
                        min(self.stop_delay, float(grace or 0)), self._remove, key
                    )
            return copy.deepcopy(obj)
        self._remove(key)
        return copy.deepcopy(obj)

    # -- watch ---------------------------------------------------------------------------

    async def _watch(
        self, request: web.Request, api: str, plural: str, namespace: str
    ) -> web.StreamResponse:
        match = parse_selector(request.query.get("labelSelector"))
        timeout = float(request.query.get("timeoutSeconds", "1800"))
        since = request.query.get("resourceVersion") or "0"
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)

        def relevant(key: Key, obj: Obj) -> bool:
            return (
                key[0] == api
                and key[1] == plural
                and (not namespace or key[2] == namespace)
                and match(_labels(obj))
            )

        async def send(kind: str, obj: Obj) -> None:
            await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        cursor = int(since)
        epoch = self._epoch
        try:
            if cursor == 0:
                cursor = self.rv
                for key, obj in sorted(self.objects.items()):
                    if relevant(key, obj):
                        await send("ADDED", copy.deepcopy(obj))
            elif cursor < self.floor:
                gone = ApiFailure(
                    410, "Expired", f"too old resource version: {cursor} ({self.floor})"
                ).status()
                self.gone_sent += 1
                await send("ERROR", gone)
                return response
            while not self._closing and loop.time() < deadline and epoch == self._epoch:
                changed = self._changed
                for rv, kind, key, obj in self.history:
                    if rv > cursor and relevant(key, obj):
                        await send(kind, obj)
                cursor = self.rv
                try:
                    async with asyncio.timeout(max(0.0, deadline - loop.time())):
                        await changed.wait()
                except TimeoutError:
                    break
        except (ConnectionResetError, asyncio.CancelledError):
            return response
        return response

    # -- scheduler and kubelet ---------------------------------------------------------

    def _kubelet_pass(self) -> None:
        """Bind pending pods to nodes with room and run them; mark the rest unschedulable."""
        if not self.kubelet:
            return
        nodes = {k[3]: n for k, n in self.objects.items() if k[1] == "nodes"}
        used: dict[str, dict[str, float]] = {name: {} for name in nodes}
        pods = [(k, p) for k, p in sorted(self.objects.items()) if k[1] == "pods"]
        for _, pod in pods:
            node = pod["spec"].get("nodeName")
            if node in used and pod["status"].get("phase") in ("Pending", "Running"):
                for res, amount in _requests(pod).items():
                    used[node][res] = used[node].get(res, 0.0) + amount
        for key, pod in pods:
            if pod["spec"].get("nodeName") or pod["metadata"].get("deletionTimestamp"):
                continue
            if pod["status"].get("phase") != "Pending":
                continue
            want = _requests(pod)
            chosen = None
            for name, node in sorted(nodes.items()):
                if not _ready(node):
                    continue
                alloc = node["status"]["allocatable"]
                if all(
                    used[name].get(r, 0.0) + a <= quantity_value(str(alloc.get(r, "0"))) + 1e-9
                    for r, a in want.items()
                ):
                    chosen = name
                    break
            new = copy.deepcopy(pod)
            if chosen is None:
                cond = [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": f"0/{len(nodes)} nodes are available",
                    }
                ]
                if new["status"].get("conditions") != cond:
                    new["status"]["conditions"] = cond
                    self._store(key, new, "MODIFIED")
                continue
            for r, a in want.items():
                used[chosen][r] = used[chosen].get(r, 0.0) + a
            new["spec"]["nodeName"] = chosen
            new["status"] = {
                "phase": "Running",
                "startTime": now_text(),
                "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Ready", "status": "True"},
                ],
                "containerStatuses": [
                    {
                        "name": c["name"],
                        "ready": True,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": now_text()}},
                    }
                    for c in new["spec"]["containers"]
                ],
            }
            self._store(key, new, "MODIFIED")


def _ready(node: Obj) -> bool:
    if (node.get("spec") or {}).get("unschedulable"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in node["status"].get("conditions") or []
    )


def _requests(pod: Obj) -> dict[str, float]:
    out: dict[str, float] = {"pods": 1.0}
    for c in pod["spec"].get("containers") or []:
        res = c.get("resources") or {}
        merged = {**(res.get("limits") or {}), **(res.get("requests") or {})}
        for name, value in merged.items():
            out[name] = out.get(name, 0.0) + quantity_value(str(value))
    return out
