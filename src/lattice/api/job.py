"""The `TrainingJob` resource, under ``exabits.ai`` and the older ``breezeml.ai`` group."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pydantic import Field, field_validator, model_validator

from lattice.api.base import ClosedModel, OpenModel
from lattice.api.pod import Container
from lattice.api.problems import SpecProblem
from lattice.api.spec import TrainingJobSpec
from lattice.api.status import TrainingJobStatus

KIND = "TrainingJob"
PLURAL = "trainingjobs"
VERSION = "v1"
GROUPS = ("exabits.ai", "breezeml.ai")  # the first is current; the second is what older docs use
API_VERSIONS = tuple(f"{g}/{VERSION}" for g in GROUPS)
DEFAULT_NAMESPACE = "default"
WORKER_INFIX = "-worker-"
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def check_dns_label(value: str, what: str) -> str:
    """A Kubernetes DNS-1123 label (lowercase letters, digits, '-'; at most 63)."""
    if not value:
        raise SpecProblem("is empty", f"give the {what} a name, e.g. example-job")
    if len(value) > 63 or not _DNS_LABEL_RE.match(value):
        raise SpecProblem(
            f"{value!r} is not a valid {what} name",
            "use at most 63 lowercase letters, digits and '-', starting and ending with a "
            "letter or digit",
        )
    return value


class ObjectMeta(OpenModel):
    name: str
    namespace: str = DEFAULT_NAMESPACE
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    creation_timestamp: datetime | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_dns_label(value, "job")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return check_dns_label(value, "namespace")


class TrainingJob(ClosedModel):
    """An elastic training job: between minSize and maxSize workers, each running the pod
    template's training container under the Lattice agent."""

    api_version: str
    kind: str
    metadata: ObjectMeta
    spec: TrainingJobSpec
    status: TrainingJobStatus | None = None

    @field_validator("api_version")
    @classmethod
    def _api_version(cls, value: str) -> str:
        if value not in API_VERSIONS:
            raise SpecProblem(
                f"{value!r} is not a TrainingJob apiVersion",
                f"use {API_VERSIONS[0]} ({API_VERSIONS[1]} is accepted too)",
            )
        return value

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        if value != KIND:
            raise SpecProblem(f"{value!r} is not this resource kind", f"use kind: {KIND}")
        return value

    @model_validator(mode="after")
    def _child_names_fit(self) -> TrainingJob:
        # Worker pods are named <job>-worker-<index>; that must stay a DNS label too.
        longest = f"{self.metadata.name}{WORKER_INFIX}{self.spec.max_size - 1}"
        if len(longest) > 63:
            room = 63 - len(WORKER_INFIX) - len(str(self.spec.max_size - 1))
            raise SpecProblem(
                f"is too long for worker pod names like {longest!r} (63 characters at most)",
                f"shorten the name to at most {room} characters",
                field="metadata.name",
            )
        return self

    @property
    def group(self) -> str:
        return self.api_version.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    @property
    def key(self) -> str:
        """``namespace/name``: unique among jobs (what allocation is keyed by)."""
        return f"{self.metadata.namespace}/{self.metadata.name}"

    @property
    def job_id(self) -> str:
        """``namespace.name[.uid8]``: the rendezvous id, token scope and checkpoint scope.

        Unambiguous: a namespace has no dots, so ``a-b``/``c`` and ``a``/``b-c`` (the same
        ``namespace-name``) stay apart. The first 8 hex digits of the object's uid, where it has
        one (Kubernetes and the local store always give one), keep a job deleted and created
        again under the same name from restoring the old one's checkpoints.
        """
        base = f"{self.metadata.namespace}.{self.metadata.name}"
        uid = "".join(c for c in (self.metadata.uid or "").lower() if c in "0123456789abcdef")
        return f"{base}.{uid[:8]}" if uid else base

    @property
    def training_container(self) -> Container:
        return self.spec.template.training_container

    def current_status(self) -> TrainingJobStatus:
        """The status, or a fresh Pending one for a job the operator has not seen yet."""
        return self.status if self.status is not None else TrainingJobStatus()

    def to_dict(self) -> dict[str, Any]:
        """The wire form, with defaults filled in and the pod template exactly as written."""
        out = self.model_dump(by_alias=True, exclude_none=True, mode="json")
        out["spec"]["replicaSpecs"]["template"] = self.spec.template.to_dict()
        return out


def worker_name(job_name: str, index: int) -> str:
    """The deterministic name of a job's worker (pod or local process)."""
    return f"{job_name}{WORKER_INFIX}{index}"
