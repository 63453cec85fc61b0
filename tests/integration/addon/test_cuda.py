"""On a GPU: kill -9 and restart of a CUDA/NCCL script is bitwise exact (skipped without CUDA).

Covers what the CPU zoo cannot: tensors snapshotted from device memory, the CUDA RNG state
(dropout on the GPU), GradScaler("cuda"), and the addon's collectives on an NCCL group.
"""

from __future__ import annotations

import pytest
import torch

from .harness import Launcher, bitwise_equal, id_lines, params, poll

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (none visible here)"
)

DETERMINISTIC = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def test_cuda_kill_and_restart_is_bitwise_exact(launcher: Launcher) -> None:
    expected = launcher.tmp / "baseline.pt"
    base = launcher.start(
        "train_cuda.py",
        1,
        lattice=False,
        ZOO_OUT=str(expected),
        ZOO_LOG=str(launcher.tmp / "base"),
        **DETERMINISTIC,
    )
    assert base.wait() == [0], base.output()
    out = launcher.tmp / "resumed.pt"
    first = launcher.start(
        "train_cuda.py",
        1,
        ZOO_OUT=str(out),
        LATTICE_CHECKPOINT_EVERY="1",
        ZOO_STEP_SLEEP="0.1",
        **DETERMINISTIC,
    )
    poll(lambda: len(id_lines(launcher.tmp)) >= 17, "training progress")
    first.kill()
    assert not out.exists(), "the first run finished before it was killed"
    second = launcher.start(
        "train_cuda.py", 1, ZOO_OUT=str(out), LATTICE_CHECKPOINT_EVERY="1", **DETERMINISTIC
    )
    assert second.wait() == [0], second.output()
    assert "restored step" in second.output()
    assert bitwise_equal(params(expected), params(out))


def test_cuda_snapshot_copies_device_tensors_to_cpu() -> None:
    from lattice.addon import state

    src = {"w": torch.randn(1024, 1024, device="cuda"), "n": 3, "t": [torch.ones(3).cuda()]}
    copy = state.detached_copy(src)
    src["w"].add_(1)  # the copy must not follow later updates
    assert copy["w"].device.type == "cpu" and copy["t"][0].device.type == "cpu"
    assert torch.equal(copy["w"] + 1, src["w"].cpu())
    assert copy["n"] == 3
