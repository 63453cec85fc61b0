"""Worker "pods" as local process groups, tied to `lattice up` (they die with it).

Each pod is one process (normally `lattice run …`, the agent) in its own session, its output
appended to ``<home>/logs/<namespace>/<pod>.log``. A graceful stop is SIGTERM to the group (the
agent turns it into a safe-point checkpoint), then SIGKILL after the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lattice.agent.workers import TRAMPOLINE, describe_exit, signal_group

log = logging.getLogger("lattice.local")


@dataclass
class Pod:
    """One worker process and what the operator core needs to know of it."""

    name: str
    job: str
    index: int
    proc: asyncio.subprocess.Process
    log_path: Path
    created: float = field(default_factory=time.time)
    exit_code: int | None = None
    message: str = ""
    deleting: bool = False
    stopper: asyncio.Task[None] | None = None

    @property
    def phase(self) -> str:
        if self.exit_code is None:
            return "Running"
        return "Succeeded" if self.exit_code == 0 else "Failed"


def _log_tail(path: Path, lines: int = 3, limit: int = 1024) -> str:
    """The last non-empty ``lines`` of a pod's log, at most ``limit`` characters."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8 * limit))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    kept = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(kept)[-limit:]


class Pods:
    """The running pods of this control plane; ``on_change`` is called when one exits."""

    def __init__(self, log_dir: Path, on_change: Callable[[], None]) -> None:
        self.log_dir = log_dir
        self._pods: dict[str, Pod] = {}
        self._on_change = on_change

    def all(self) -> list[Pod]:
        return list(self._pods.values())

    def get(self, name: str) -> Pod | None:
        return self._pods.get(name)

    def of_job(self, job: str) -> list[Pod]:
        return [p for p in self._pods.values() if p.job == job]

    async def start(
        self,
        name: str,
        job: str,
        index: int,
        command: Sequence[str],
        env: Mapping[str, str],
        cwd: Path,
        namespace: str,
    ) -> Pod:
        log_path = self.log_dir / namespace / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-S",
                    "-I",
                    str(TRAMPOLINE),
                    str(os.getpid()),
                    *command,
                    env=dict(env),
                    cwd=str(cwd),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                out.write(f"lattice: cannot start pod {name}: {exc}\n".encode())
                raise
        pod = Pod(name, job, index, proc, log_path)
        self._pods[name] = pod
        asyncio.get_running_loop().create_task(self._reap(pod))
        log.info("pod %s started (pid %d): %s", name, proc.pid, " ".join(command))
        return pod

    async def _reap(self, pod: Pod) -> None:
        code = await pod.proc.wait()
        pod.exit_code = code
        pod.message = describe_exit(code)
        if code != 0:  # like Kubernetes' FallbackToLogsOnError: the output's last lines
            tail = _log_tail(pod.log_path)
            pod.message += f": {tail}" if tail else ""
        signal_group(pod.proc.pid, signal.SIGKILL)  # nothing of the pod outlives it
        log.info("pod %s %s", pod.name, describe_exit(code))
        if pod.deleting:
            self._pods.pop(pod.name, None)
        self._on_change()

    def delete(self, name: str, *, graceful: bool, grace_s: float) -> None:
        """Stop a pod (SIGTERM, SIGKILL after ``grace_s``; at once if not graceful) and forget
        it once it has exited."""
        pod = self._pods.get(name)
        if pod is None:
            return
        if pod.exit_code is not None:
            self._pods.pop(name, None)
            self._on_change()
            return
        if pod.deleting and graceful:
            return
        pod.deleting = True
        if pod.stopper is not None:
            pod.stopper.cancel()
        pod.stopper = asyncio.get_running_loop().create_task(
            self._stop(pod, grace_s if graceful else 0.0)
        )

    async def _stop(self, pod: Pod, grace_s: float) -> None:
        if grace_s > 0:
            signal_group(pod.proc.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await pod.proc.wait()
        signal_group(pod.proc.pid, signal.SIGKILL)

    async def stop_all(self, grace_s: float) -> None:
        for pod in self.all():
            self.delete(pod.name, graceful=True, grace_s=grace_s)
        deadline = time.monotonic() + grace_s + 10
        while self._pods and time.monotonic() < deadline:
            pending = [p.proc.wait() for p in self._pods.values() if p.exit_code is None]
            if not pending:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    await asyncio.gather(*pending)
        for pod in self.all():
            signal_group(pod.proc.pid, signal.SIGKILL)
