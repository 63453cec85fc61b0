"""`TrainingJob.spec`: sizes, the pod template, and the optional policies older releases had."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, WithJsonSchema, field_validator, model_validator

from lattice.api.base import ClosedModel
from lattice.api.pod import PodTemplate
from lattice.api.problems import SpecProblem

NPROC_WORDS = ("auto", "gpu", "cpu")
_EVERY_RE = re.compile(r"^([1-9][0-9]*)(s?)$")
_INT_OR_STRING: dict[str, Any] = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
_RESOURCE_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")


def _nproc(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, bool):
        raise SpecProblem(f"{value!r} is not a process count", "use a number or auto, gpu, cpu")
    if isinstance(value, int):
        if value < 1:
            raise SpecProblem(f"{value} is below 1", "use at least 1, or auto, gpu, cpu")
        return value
    text = str(value).strip().lower()
    if text.isdigit() and int(text) >= 1:
        return int(text)
    if text in NPROC_WORDS:
        return text
    raise SpecProblem(f"{value!r} is not a process count", "use a number or auto, gpu, cpu")


def _every(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    text = str(value).strip()
    if not _EVERY_RE.match(text):
        raise SpecProblem(
            f"{value!r} is not a checkpoint interval",
            'use "N" for every N steps or "Ns" for every N seconds, e.g. "100" or "300s"',
        )
    return text


class RunPolicy(ClosedModel):
    """How failures and finished jobs are handled (the Kubeflow ``runPolicy`` subset)."""

    backoff_limit: int = Field(
        default=6, ge=0, description="worker failures tolerated before the job fails"
    )
    active_deadline_seconds: int | None = Field(
        default=None, gt=0, description="fail the job this long after it started"
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="delete the finished job after this long"
    )
    clean_pod_policy: Literal["All", "Running", "None"] = Field(
        default="Running", description="which workers to delete when the job finishes"
    )


class CheckpointPolicy(ClosedModel):
    """When the addon checkpoints: ``every`` N steps ("100") or N seconds ("300s")."""

    enabled: bool = Field(default=True, description="false: no checkpoints (addon off)")
    every: Annotated[str | None, BeforeValidator(_every), WithJsonSchema(_INT_OR_STRING)] = Field(
        default=None, description='"N": every N steps; "Ns": every N seconds'
    )
    keep: int | None = Field(default=None, ge=1, description="checkpoints to retain")

    @property
    def every_steps(self) -> int | None:
        return int(self.every) if self.every and not self.every.endswith("s") else None

    @property
    def every_seconds(self) -> int | None:
        return int(self.every[:-1]) if self.every and self.every.endswith("s") else None


class ReplicaSpecs(ClosedModel):
    template: PodTemplate


class TrainingJobSpec(ClosedModel):
    min_size: int = Field(
        json_schema_extra={"minimum": 1}, description="fewest workers the job runs with"
    )
    max_size: int = Field(
        json_schema_extra={"minimum": 1}, description="most workers the job runs with"
    )
    replica_specs: ReplicaSpecs = Field(description="the worker pod template")
    priority: int = Field(default=0, description="higher runs first and keeps its slots")
    framework: Literal["generic", "pytorch"] = Field(
        default="pytorch", description="generic: no PyTorch addon in the workers"
    )
    inject_lattice: bool = Field(
        default=True, description="false: run the command as is, without the Lattice agent"
    )
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    nproc_per_node: Annotated[
        int | str | None, BeforeValidator(_nproc), WithJsonSchema(_INT_OR_STRING)
    ] = Field(default=None, description="processes per worker: N, auto, gpu or cpu")
    checkpoint: CheckpointPolicy = Field(default_factory=CheckpointPolicy)
    resource_unit: str = Field(
        default="pods", description="what one slot is: pods, cpu, nvidia.com/gpu …"
    )

    @field_validator("min_size", "max_size")
    @classmethod
    def _size(cls, value: int) -> int:
        if value < 1:
            raise SpecProblem(f"{value} is below 1", "use a size of at least 1 worker")
        return value

    @field_validator("resource_unit")
    @classmethod
    def _unit(cls, value: str) -> str:
        if value in ("pods", "cpu") or _RESOURCE_RE.match(value):
            return value
        raise SpecProblem(
            f"{value!r} is not a slot unit",
            "use pods, cpu or an extended resource such as nvidia.com/gpu",
        )

    @model_validator(mode="after")
    def _consistent(self) -> TrainingJobSpec:
        if self.min_size > self.max_size:
            raise SpecProblem(
                f"{self.min_size} is larger than maxSize ({self.max_size})",
                "lower minSize or raise maxSize so that minSize <= maxSize",
                field="minSize",
            )
        container = self.replica_specs.template.training_container
        index = self.replica_specs.template.spec.training_index
        if not container.command:
            raise SpecProblem(
                "is empty",
                'set the training command, e.g. ["python", "-u", "main.py"]',
                field=f"replicaSpecs.template.spec.containers[{index}].command",
            )
        unit = self.resource_unit
        if unit != "pods" and all(
            c.resources.amount(unit) is None for c in self.replica_specs.template.spec.containers
        ):
            raise SpecProblem(
                f"is {unit!r} but no container asks for {unit}",
                f"set resources.limits[{unit!r}] on the training container, or use pods",
                field="resourceUnit",
            )
        return self

    @property
    def template(self) -> PodTemplate:
        return self.replica_specs.template

    @property
    def slots_per_worker(self) -> int:
        """Slots of ``resourceUnit`` one worker takes (what allocation counts in)."""
        return self.template.slots(self.resource_unit)
