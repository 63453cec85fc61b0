"""`lattice up` as a child process: what the demo, the tests and the benchmarks start.

One place knows how to start it, when it is ready (it writes ``<home>/endpoint`` once it
answers), and how to stop it (SIGTERM: workers get their grace period; then SIGKILL of its
process group).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

LATTICE = [sys.executable, "-m", "lattice"]
DEFAULT_WORKER_GRACE_S = 30.0  # `lattice up --worker-grace`'s default


class UpFailed(RuntimeError):
    """`lattice up` exited or did not answer in time; the message ends with its log."""


class UpProcess:
    """One `lattice up --home HOME`, its output in ``HOME/up.log``."""

    def __init__(
        self,
        home: Path,
        *,
        slots: int,
        images: Mapping[str, Path] | None = None,
        resize_cooldown_s: float | None = None,
        worker_grace_s: float | None = None,
    ) -> None:
        self.home = home
        self.log = home / "up.log"
        self.worker_grace_s = worker_grace_s
        self.args = ["up", "--slots", str(slots), "--home", str(home)]
        if resize_cooldown_s is not None:
            self.args += ["--resize-cooldown", str(resize_cooldown_s)]
        if worker_grace_s is not None:
            self.args += ["--worker-grace", str(worker_grace_s)]
        for name, directory in (images or {}).items():
            self.args += ["--image", f"{name}={directory}"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, bound_s: float = 60.0) -> None:
        """Start it and return once it answers; `UpFailed` if it exits or takes over ``bound_s``."""
        self.home.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*LATTICE, *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + bound_s
        while not (self.home / "endpoint").exists():
            if self.proc.poll() is not None:
                raise UpFailed(f"lattice up exited ({self.proc.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise UpFailed(f"lattice up did not answer in {bound_s:.0f} s:\n{self.tail()}")
            time.sleep(0.1)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, wait for the workers' grace (+40 s), then SIGKILL its process group."""
        grace = DEFAULT_WORKER_GRACE_S if self.worker_grace_s is None else self.worker_grace_s
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace + 40.0)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""
