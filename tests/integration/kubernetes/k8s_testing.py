"""Helpers of the operator's integration tests: operator replicas in the test's event loop,
bounded polling, and TrainingJob manifests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from lattice.operator.kubernetes import KubeApi, OperatorConfig, OperatorProcess
from lattice.operator.kubernetes.runner import LeaderConfig


class Operators:
    """Starts operator replicas (each an `OperatorProcess` in this event loop)."""

    def __init__(self, kubeconfig: Path, base: OperatorConfig) -> None:
        self.kubeconfig = kubeconfig
        self.base = base
        self.running: list[tuple[OperatorProcess, asyncio.Task[None], KubeApi]] = []

    async def start(
        self, *, leader: LeaderConfig | None = None, **overrides: Any
    ) -> OperatorProcess:
        api = KubeApi.connect(str(self.kubeconfig))
        process = OperatorProcess(
            api, replace(self.base, **overrides), leader=leader, host="127.0.0.1", port=0
        )
        started = asyncio.Event()
        task = asyncio.create_task(process.serve(started))
        self.running.append((process, task, api))
        async with asyncio.timeout(30):
            await started.wait()
        return process

    async def stop(self, process: OperatorProcess) -> None:
        for item in list(self.running):
            if item[0] is process:
                self.running.remove(item)
                _, task, api = item
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await api.close()

    async def stop_all(self) -> None:
        for process, _, _ in list(self.running):
            await self.stop(process)


async def until(check: Callable[[], Any], *, timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def job_manifest(
    name: str,
    *,
    group: str = "exabits.ai",
    namespace: str = "team",
    min_size: int = 1,
    max_size: int = 3,
    cpu: str | None = None,
    **spec: Any,
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "trainingjob",
        "image": "exabits/lattice-resnet",
        "command": ["python", "-u", "main.py"],
        "args": ["--epochs", "3"],
        "env": [{"name": "USER_SETTING", "value": "kept"}],
    }
    if cpu is not None:
        container["resources"] = {"requests": {"cpu": cpu}, "limits": {"cpu": cpu}}
        spec.setdefault("resourceUnit", "cpu")
    return {
        "apiVersion": f"{group}/v1",
        "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "minSize": min_size,
            "maxSize": max_size,
            "replicaSpecs": {
                "template": {
                    "metadata": {"labels": {"team": "vision"}},
                    "spec": {
                        "containers": [container],
                        "tolerations": [{"key": "gpu", "operator": "Exists"}],
                        "futureField": {"kept": True},
                    },
                }
            },
            **spec,
        },
    }
