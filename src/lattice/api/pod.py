"""The Kubernetes pod template inside a TrainingJob, validated where Lattice needs it.

Only the fields Lattice reads are modelled; everything else in the template (volumes,
tolerations, securityContext, …) is kept verbatim and reaches the worker pods unchanged.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, WithJsonSchema, field_validator

from lattice.api.base import OpenModel
from lattice.api.problems import SpecProblem

TRAINING_CONTAINER = "trainingjob"  # the container Lattice wraps, when a pod has several

_OPAQUE: dict[str, Any] = {"type": "object", "additionalProperties": True}
_QUANTITY_RE = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$")
_SUFFIX = {
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
    "": 1.0,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
    "Pi": 2.0**50,
    "Ei": 2.0**60,
}


def quantity_value(text: str) -> float:
    """A Kubernetes quantity (``"500m"``, ``"2"``, ``"1Gi"``) as a number."""
    m = _QUANTITY_RE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    number, suffix = float(m.group(1)), m.group(2) or ""
    try:
        if suffix[:1] in ("e", "E") and len(suffix) > 1:
            value = number * 10.0 ** int(suffix[1:])
        else:
            value = number * _SUFFIX[suffix]
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is too large a quantity")
    return value


def _quantity(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        value = str(value)
    if isinstance(value, str):
        try:
            quantity_value(value)
        except ValueError as exc:
            raise SpecProblem(
                f"{value!r} is not a quantity", "write a number with an optional unit, e.g. 2, 500m"
            ) from exc
    return value


def _env_value(value: Any) -> Any:
    # YAML turns `value: 1` into an int; Kubernetes wants strings. Be kind and convert scalars.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


Quantity = Annotated[str, BeforeValidator(_quantity)]


class EnvVar(OpenModel):
    """A container environment variable; ``valueFrom`` is kept opaque for the cluster."""

    name: str
    value: Annotated[str | None, BeforeValidator(_env_value)] = None
    value_from: dict[str, Any] | None = None


class Resources(OpenModel):
    limits: dict[str, Quantity] = Field(default_factory=dict)
    requests: dict[str, Quantity] = Field(default_factory=dict)

    def amount(self, resource: str) -> float | None:
        """How much of ``resource`` the container gets: its limit, else its request."""
        raw = self.limits.get(resource, self.requests.get(resource))
        return None if raw is None else quantity_value(raw)


class Container(OpenModel):
    name: str
    image: str
    command: list[str] = Field(default_factory=list)
    args: list[str] = Field(default_factory=list)
    env: list[EnvVar] = Field(default_factory=list)
    # Opaque in the CRD: quantities may be written as numbers or strings.
    resources: Annotated[Resources, WithJsonSchema(_OPAQUE)] = Field(default_factory=Resources)
    working_dir: str | None = None
    volume_mounts: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if not value.strip():
            raise SpecProblem("is empty", "name the container image, e.g. exabits/lattice-resnet")
        return value


class PodSpec(OpenModel):
    containers: list[Container]

    @field_validator("containers")
    @classmethod
    def _containers(cls, value: list[Container]) -> list[Container]:
        if not value:
            raise SpecProblem("is empty", "add the training container with its image and command")
        names = [c.name for c in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SpecProblem(
                f"container name {dupes[0]!r} is used twice", "give each a unique name"
            )
        return value

    @property
    def training_index(self) -> int:
        """Which container runs the training: the one named ``trainingjob``, else the first."""
        for i, c in enumerate(self.containers):
            if c.name == TRAINING_CONTAINER:
                return i
        return 0


class PodTemplate(OpenModel):
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: PodSpec

    def to_dict(self) -> dict[str, Any]:
        """The template as the user wrote it (unknown fields included, no defaults added)."""
        return self.model_dump(by_alias=True, exclude_unset=True, mode="json")

    @property
    def training_container(self) -> Container:
        return self.spec.containers[self.spec.training_index]

    def slots(self, resource_unit: str) -> int:
        """How many slots of ``resource_unit`` one worker takes (a pod is one slot of "pods")."""
        if resource_unit == "pods":
            return 1
        total = sum(c.resources.amount(resource_unit) or 0.0 for c in self.spec.containers)
        return max(1, math.ceil(total - 1e-9))
