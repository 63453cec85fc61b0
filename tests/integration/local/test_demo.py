"""The README's main command: `examples/demo.py` on the local control plane, in its quick size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_demo_grows_survives_a_kill_shrinks_and_succeeds(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "demo.py"), "--quick", "--home", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0 and result["ok"], done.stdout[-6000:]
    # Every stage happened: the job grew, re-formed after the kill with its state restored
    # from a checkpoint (not from step 0), shrank for the second job, and both succeeded.
    assert result["restored_step"] >= 1, result
    assert result["restarts"] >= 1, result
    for stage in ("grow_s", "recovery_s", "shrink_s", "total_s"):
        assert result[stage] > 0, result
    assert "example-job   Succeeded" in done.stdout and "second-job    Succeeded" in done.stdout
