from __future__ import annotations

from pathlib import Path

import pytest

from lattice.addon import local_tier


def test_roundtrip_and_listing(tmp_path: Path) -> None:
    for step in (3, 12, 7):
        local_tier.write_file(local_tier.step_dir(tmp_path, step) / "state.pt", b"x" * step)
    assert local_tier.steps(tmp_path) == [12, 7, 3]
    assert local_tier.read_file(local_tier.step_dir(tmp_path, 7) / "state.pt") == b"x" * 7
    local_tier.prune(tmp_path, keep=2)
    assert local_tier.steps(tmp_path) == [12, 7]
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "headerless"])
def test_damaged_file_is_rejected(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "f.pt"
    local_tier.write_file(path, bytes(range(256)) * 10)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[100] ^= 1
    elif damage == "truncate":
        raw = raw[:-1]
    else:
        raw = raw[70:]
    path.write_bytes(bytes(raw))
    with pytest.raises(local_tier.CorruptFile):
        local_tier.read_file(path)
