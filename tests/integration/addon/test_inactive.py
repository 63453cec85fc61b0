"""Without a Lattice job, or with LATTICE_AUTOPATCH=none, the bootstrap does nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .harness import BOOTSTRAP, REPO, Launcher

PROBE = "import sys; print('torch' in sys.modules, 'lattice.addon.runtime' in sys.modules)"


def probe(**env: str) -> str:
    full = {k: v for k, v in os.environ.items() if not k.startswith("LATTICE_")}
    full.update(PYTHONPATH=f"{BOOTSTRAP}{os.pathsep}{REPO / 'src'}", **env)
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=full, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_bootstrap_never_imports_torch_itself() -> None:
    assert probe(LATTICE_JOB="j") == "False False"


@pytest.mark.parametrize("env", [{}, {"LATTICE_JOB": "zoo", "LATTICE_AUTOPATCH": "none"}])
def test_no_job_or_autopatch_none_leaves_training_alone(
    launcher: Launcher, env: dict[str, str]
) -> None:
    run = launcher.start("train_workers.py", 1, lattice=False, ZOO_EPOCHS="1", **env)
    assert run.wait() == [0], run.output()
    assert not (launcher.tmp / "local").exists()
    assert "lattice addon" not in run.output()
