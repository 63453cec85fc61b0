"""The Kubernetes resources the operator touches, and exactly which verbs it uses on each.

`PERMISSIONS` is the one declaration of the operator's API rights: `KubeApi` refuses any call
it does not list, and the RBAC in ``deploy/rbac`` is checked against it by a test, so the
ClusterRole grants exactly what the code uses and nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass

from lattice.api.job import GROUPS, KIND, PLURAL, VERSION


@dataclass(frozen=True)
class Resource:
    """One REST resource: ``group`` "" is the core API; ``subresource`` e.g. "status"."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    subresource: str = ""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def rbac_name(self) -> str:
        """How RBAC rules name it: ``pods``, ``trainingjobs/status``."""
        return f"{self.plural}/{self.subresource}" if self.subresource else self.plural

    def status(self) -> Resource:
        return Resource(self.group, self.version, self.plural, self.kind, self.namespaced, "status")

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        """The URL path: a collection (all namespaces when ``namespace`` is None) or one object."""
        parts = ["api", self.version] if not self.group else ["apis", self.group, self.version]
        if self.namespaced and namespace is not None:
            parts += ["namespaces", namespace]
        parts.append(self.plural)
        if name is not None:
            parts.append(name)
            if self.subresource:
                parts.append(self.subresource)
        return "/" + "/".join(parts)


PODS = Resource("", "v1", "pods", "Pod")
SERVICES = Resource("", "v1", "services", "Service")
SECRETS = Resource("", "v1", "secrets", "Secret")
EVENTS = Resource("", "v1", "events", "Event")
NODES = Resource("", "v1", "nodes", "Node", namespaced=False)
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease")
TRAININGJOBS: tuple[Resource, ...] = tuple(Resource(g, VERSION, PLURAL, KIND) for g in GROUPS)
TRAININGJOB_STATUS: tuple[Resource, ...] = tuple(r.status() for r in TRAININGJOBS)

# Every verb the operator uses, per resource. Secrets are written, never read: the operator
# creates each job's token Secret (or overwrites a stale one) but cannot read any Secret.
PERMISSIONS: dict[Resource, frozenset[str]] = {
    **dict.fromkeys(TRAININGJOBS, frozenset({"get", "list", "watch", "update", "delete"})),
    **dict.fromkeys(TRAININGJOB_STATUS, frozenset({"update"})),
    PODS: frozenset({"list", "watch", "create", "delete"}),
    SERVICES: frozenset({"create", "get", "update"}),
    SECRETS: frozenset({"create", "update"}),
    EVENTS: frozenset({"create"}),
    LEASES: frozenset({"get", "create", "update"}),
    NODES: frozenset({"list", "watch"}),
}
