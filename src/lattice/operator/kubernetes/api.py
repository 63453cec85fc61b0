"""A small dict-in, dict-out Kubernetes REST client for the operator.

lightkube finds and authenticates the cluster (in-cluster service account, ``KUBECONFIG``,
``~/.kube/config``; tokens, client certificates, exec plugins) and gives an HTTP client; the
calls themselves are plain REST on dicts, so user pod templates reach the API exactly as
written (typed models drop fields they do not know). Every call is checked against
`PERMISSIONS`: the code cannot use a verb the RBAC does not grant.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx2
from lightkube.config.client_adapter import AsyncClient as _lightkube_http
from lightkube.config.client_adapter import ConnectionParams
from lightkube.config.kubeconfig import KubeConfig
from lightkube.core.exceptions import ConfigError

from lattice.common.errors import UserError
from lattice.operator.kubernetes.resources import PERMISSIONS, Resource

log = logging.getLogger("lattice.operator.kubernetes")

Obj = dict[str, Any]
REQUEST_TIMEOUT_S = 15.0


class ApiError(Exception):
    """The API server said no (``code`` is the HTTP status; 0: it could not be reached)."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}" if code else f"unreachable: {message}")
        self.code = code
        self.reason = reason
        self.message = message

    @property
    def not_found(self) -> bool:
        return self.code == 404

    @property
    def conflict(self) -> bool:
        """A stale resourceVersion (409 Conflict), not a name clash."""
        return self.code == 409 and self.reason != "AlreadyExists"

    @property
    def already_exists(self) -> bool:
        return self.code == 409 and self.reason == "AlreadyExists"

    @property
    def gone(self) -> bool:
        """A watch's resourceVersion is too old (410): list again."""
        return self.code == 410


class UndeclaredVerb(RuntimeError):
    """The code called a verb `PERMISSIONS` does not declare (a bug: RBAC would refuse it)."""


def _error(response_code: int, body: bytes) -> ApiError:
    try:
        status = json.loads(body)
    except ValueError:
        status = None
    if isinstance(status, dict):
        return ApiError(
            int(status.get("code") or response_code),
            str(status.get("reason") or ""),
            str(status.get("message") or ""),
        )
    return ApiError(response_code, "", body[:300].decode(errors="replace"))


def load_config(kubeconfig: str | None = None, context: str | None = None) -> Any:
    """The cluster to talk to: ``kubeconfig`` if given, else in-cluster, else ``$KUBECONFIG``
    or ``~/.kube/config``."""
    try:
        config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
        return config.get(context)
    except (ConfigError, KeyError, OSError) as exc:
        raise UserError(
            f"no Kubernetes cluster configured ({exc}): run in a cluster, set KUBECONFIG, "
            "or pass --kubeconfig"
        ) from exc


class KubeApi:
    """Async REST calls on dicts. ``on_request(verb, resource)`` observes every call."""

    def __init__(
        self,
        http: httpx2.AsyncClient,
        *,
        permissions: Mapping[Resource, frozenset[str]] = PERMISSIONS,
        on_request: Callable[[str, Resource], None] | None = None,
    ) -> None:
        self._http = http
        self._permissions = permissions
        self._on_request = on_request

    @classmethod
    def connect(cls, kubeconfig: str | None = None, context: str | None = None) -> KubeApi:
        config = load_config(kubeconfig, context)
        params = ConnectionParams(timeout=httpx2.Timeout(REQUEST_TIMEOUT_S))
        try:
            return cls(_lightkube_http(config, params))
        except (ConfigError, AssertionError, OSError) as exc:
            raise UserError(f"cannot use the Kubernetes configuration: {exc}") from exc

    async def close(self) -> None:
        await self._http.aclose()

    def _check(self, verb: str, res: Resource) -> None:
        if verb not in self._permissions.get(res, frozenset()):
            raise UndeclaredVerb(f"{verb} {res.rbac_name} ({res.api_version}) is not declared")
        if self._on_request is not None:
            self._on_request(verb, res)

    async def _call(
        self, method: str, path: str, *, params: dict[str, str] | None = None, body: Any = None
    ) -> Obj:
        try:
            response = await self._http.request(
                method,
                path,
                params=params,
                content=None if body is None else json.dumps(body).encode(),
                headers={"Content-Type": "application/json"} if body is not None else None,
            )
        except httpx2.TransportError as exc:
            raise ApiError(0, "Unavailable", str(exc) or type(exc).__name__) from exc
        if response.status_code >= 400:
            raise _error(response.status_code, response.content)
        try:
            return dict(response.json())
        except ValueError as exc:
            raise ApiError(
                response.status_code, "BadResponse", f"not a JSON object: {exc}"
            ) from exc

    async def get(self, res: Resource, name: str, namespace: str | None = None) -> Obj:
        self._check("get", res)
        return await self._call("GET", res.path(namespace, name))

    async def list(
        self, res: Resource, namespace: str | None = None, labels: str | None = None
    ) -> tuple[list[Obj], str]:
        """Objects (in ``namespace``, or all) and the list's resourceVersion."""
        self._check("list", res)
        params = {"labelSelector": labels} if labels else None
        data = await self._call("GET", res.path(namespace), params=params)
        items = list(data.get("items") or [])
        for item in items:  # list items carry no kind on real servers
            item.setdefault("apiVersion", res.api_version)
            item.setdefault("kind", res.kind)
        return items, str((data.get("metadata") or {}).get("resourceVersion") or "")

    async def watch(
        self,
        res: Resource,
        namespace: str | None = None,
        labels: str | None = None,
        resource_version: str | None = None,
        timeout_s: int = 300,
    ) -> AsyncIterator[tuple[str, Obj]]:
        """Change events (ADDED, MODIFIED, DELETED, BOOKMARK) until the server ends the watch.

        Raises `ApiError` with ``gone`` when ``resource_version`` is too old.
        """
        self._check("watch", res)
        params = {"watch": "true", "timeoutSeconds": str(timeout_s), "allowWatchBookmarks": "true"}
        if labels:
            params["labelSelector"] = labels
        if resource_version:
            params["resourceVersion"] = resource_version
        timeout = httpx2.Timeout(REQUEST_TIMEOUT_S, read=timeout_s + REQUEST_TIMEOUT_S)
        try:
            async with self._http.stream(
                "GET", res.path(namespace), params=params, timeout=timeout
            ) as response:
                if response.status_code >= 400:
                    raise _error(response.status_code, await response.aread())
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    try:
                        event = json.loads(line)
                        kind, obj = event.get("type"), event.get("object") or {}
                    except (ValueError, AttributeError) as exc:
                        raise ApiError(0, "BadWatchEvent", f"{line[:200]!r}: {exc}") from exc
                    if kind == "ERROR":
                        raise _error(int(obj.get("code") or 500), json.dumps(obj).encode())
                    yield str(kind), obj
        except httpx2.HTTPError as exc:
            raise ApiError(0, "Unavailable", str(exc) or type(exc).__name__) from exc

    async def create(self, res: Resource, obj: Obj, namespace: str | None = None) -> Obj:
        self._check("create", res)
        ns = namespace if namespace is not None else obj.get("metadata", {}).get("namespace")
        return await self._call("POST", res.path(ns if res.namespaced else None), body=obj)

    async def replace(self, res: Resource, obj: Obj) -> Obj:
        """PUT the object (or its status, for a status subresource); its resourceVersion, if
        any, must be current (else a conflict)."""
        self._check("update", res)
        meta = obj["metadata"]
        return await self._call("PUT", res.path(meta.get("namespace"), meta["name"]), body=obj)

    async def delete(
        self,
        res: Resource,
        name: str,
        namespace: str | None = None,
        *,
        grace_period_s: int | None = None,
    ) -> None:
        """Delete; ``grace_period_s`` None: the object's own (a pod's
        terminationGracePeriodSeconds); 0: at once."""
        self._check("delete", res)
        body: Obj = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if grace_period_s is not None:
            body["gracePeriodSeconds"] = grace_period_s
        await self._call("DELETE", res.path(namespace, name), body=body)
