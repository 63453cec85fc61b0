"""The Kubernetes adapter of the operator: observes TrainingJobs (``exabits.ai/v1`` and
``breezeml.ai/v1``), their worker pods and the nodes, asks `lattice.operator.core` what to do,
and applies the answer (pods, a headless Service, a token Secret, status, Events).

`Controller` is the loop, `KubeApi` the REST client (connection by lightkube),
`LeaderElector` the Lease, `OperatorProcess` all of it behind ``lattice operator``.
"""

from lattice.operator.kubernetes.api import ApiError, KubeApi
from lattice.operator.kubernetes.controller import Controller, OperatorConfig
from lattice.operator.kubernetes.leader import LeaderElector
from lattice.operator.kubernetes.resources import PERMISSIONS, Resource
from lattice.operator.kubernetes.runner import LeaderConfig, OperatorProcess

__all__ = [
    "PERMISSIONS",
    "ApiError",
    "Controller",
    "KubeApi",
    "LeaderConfig",
    "LeaderElector",
    "OperatorConfig",
    "OperatorProcess",
    "Resource",
]
