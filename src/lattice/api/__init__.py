"""The TrainingJob API: the pydantic model, loading with clear errors, and the CRD it generates.

``apiVersion`` is ``exabits.ai/v1``; ``breezeml.ai/v1`` (what older docs use) is accepted too.
"""

from lattice.api.job import (
    API_VERSIONS,
    GROUPS,
    KIND,
    PLURAL,
    VERSION,
    ObjectMeta,
    TrainingJob,
    worker_name,
)
from lattice.api.load import load_documents, parse_job
from lattice.api.pod import Container, EnvVar, PodSpec, PodTemplate, Resources
from lattice.api.spec import CheckpointPolicy, ReplicaSpecs, RunPolicy, TrainingJobSpec
from lattice.api.status import (
    PHASES,
    TERMINAL_PHASES,
    CapacityLimit,
    Condition,
    LastCheckpoint,
    Phase,
    TrainingJobStatus,
    WorkerFailure,
)

__all__ = [
    "API_VERSIONS",
    "GROUPS",
    "KIND",
    "PHASES",
    "PLURAL",
    "TERMINAL_PHASES",
    "VERSION",
    "CapacityLimit",
    "CheckpointPolicy",
    "Condition",
    "Container",
    "EnvVar",
    "LastCheckpoint",
    "ObjectMeta",
    "Phase",
    "PodSpec",
    "PodTemplate",
    "ReplicaSpecs",
    "Resources",
    "RunPolicy",
    "TrainingJob",
    "TrainingJobSpec",
    "TrainingJobStatus",
    "WorkerFailure",
    "load_documents",
    "parse_job",
    "worker_name",
]
