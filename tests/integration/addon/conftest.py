from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import Launcher


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    runner = Launcher(tmp_path)
    try:
        yield runner
    finally:
        runner.close()
