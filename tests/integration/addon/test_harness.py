"""The harness's own judgement of a plain run: one stuck at exit after its work is not lost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .harness import Run


def test_a_run_stuck_after_writing_its_output_is_settled_and_a_run_without_one_is_not(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out.pt"
    write_then_hang = f"open({str(out)!r}, 'w').write('x'); import time; time.sleep(600)"
    hang = "import time; time.sleep(600)"

    def run(*codes: str) -> Run:
        procs = [
            subprocess.Popen([sys.executable, "-c", code], start_new_session=True) for code in codes
        ]
        return Run(procs, [])

    done = run(write_then_hang, "pass")
    assert done.settle(out, grace=0.5) == [None, 0]
    assert all(proc.poll() is not None for proc in done.procs)  # the stuck one was killed
    out.unlink()
    stuck = run(hang)
    assert stuck.settle(out, grace=0.5, timeout=2.0) == [None] and not out.exists()
