from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lattice.addon import local_tier


def test_roundtrip_and_listing(tmp_path: Path) -> None:
    for step in (3, 12, 7):
        local_tier.save(local_tier.step_dir(tmp_path, step) / "state.pt", {"n": torch.ones(step)})
    assert local_tier.steps(tmp_path) == [12, 7, 3]
    got = local_tier.load(local_tier.step_dir(tmp_path, 7) / "state.pt")
    assert torch.equal(got["n"], torch.ones(7))
    local_tier.prune(tmp_path, keep=2)
    assert local_tier.steps(tmp_path) == [12, 7]
    assert not list(tmp_path.rglob("*.tmp"))
    local_tier.step_dir(tmp_path, 20).mkdir()  # another rank's piece of step 20, written first
    local_tier.prune(tmp_path, keep=1, below=20)  # room before step 20's state: 20 stays
    assert local_tier.steps(tmp_path) == [20, 12]


def test_two_nodes_files_of_one_state_have_one_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nodes compare checksums to tell one history from two: the same state saved by two
    processes (different pids, different temporary names) must give the same bytes."""
    obj = {"w": torch.arange(100, dtype=torch.float32), "step": 7}
    recorded = []
    for node, pid in (("a", 1111), ("b", 2222)):
        monkeypatch.setattr(local_tier.os, "getpid", lambda pid=pid: pid)
        path = local_tier.step_dir(tmp_path / node, 7) / "state.pt"
        local_tier.save(path, obj)
        recorded.append(local_tier.recorded(path))
    assert recorded[0] is not None and recorded[0] == recorded[1]


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 1 KiB: the multi-chunk, multi-thread path on a small file."""
    monkeypatch.setattr(local_tier, "CHUNK", 1024)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize(
    "damage", ["flip-first", "flip-last", "truncate", "extend", "no-checksum", "bad-checksum"]
)
@pytest.mark.parametrize("mapped", [False, True])
def test_damaged_file_is_rejected(tmp_path: Path, damage: str, mapped: bool) -> None:
    path = tmp_path / "f.pt"
    local_tier.save(path, {"w": torch.arange(5000, dtype=torch.float32)})
    assert path.stat().st_size > 8 * local_tier.CHUNK
    local_tier.verify(path)  # whole: accepted
    assert torch.equal(local_tier.load(path, mapped=mapped)["w"], torch.arange(5000.0))
    raw = bytearray(path.read_bytes())
    summed = path.with_name(path.name + local_tier.SUM_SUFFIX)
    if damage == "flip-first":
        raw[10] ^= 1
    elif damage == "flip-last":
        raw[-10] ^= 1
    elif damage == "truncate":
        raw = raw[:-1]
    elif damage == "extend":
        raw += b"\0"
    elif damage == "no-checksum":
        summed.unlink()
    else:
        text = summed.read_text()
        summed.write_text(text[:-3] + ("0" if text[-3] != "0" else "1") + text[-2:])
    path.write_bytes(bytes(raw))
    with pytest.raises(local_tier.CorruptFile):
        local_tier.load(path, mapped=mapped)


def test_checksum_is_the_same_with_one_thread_or_many(tmp_path: Path, small_chunks: None) -> None:
    path = tmp_path / "f.pt"
    path.write_bytes(bytes(range(256)) * 100)
    assert local_tier.checksum(path, threads=1) == local_tier.checksum(path, threads=4)


def test_a_rewrite_drops_the_old_checksum_before_the_data_changes(tmp_path: Path) -> None:
    path = tmp_path / "f.pt"
    local_tier.save(path, {"v": torch.zeros(3)})
    summed = path.with_name(path.name + local_tier.SUM_SUFFIX)
    old = summed.read_text()
    local_tier.save(path, {"v": torch.ones(3)})
    assert summed.read_text() != old
    assert torch.equal(local_tier.load(path)["v"], torch.ones(3))


def test_a_newer_rounds_steps_come_before_an_abandoned_historys_higher_steps() -> None:
    """The soak's case: round 854 reached step 6294 on all nodes; round 855 (node C away)
    restored the service's 6222 and wrote up to 6280; C is back in round 856. C's 6294 belongs
    to the abandoned history and must come after the newer round's steps."""
    nodes_a_b = {6280: ("sum-6280", 855), 6279: ("sum-6279", 855)}
    node_c = {6294: ("old-6294", 854), 6293: ("old-6293", 854)}
    order = local_tier.ranked([nodes_a_b, nodes_a_b, node_c], None)
    assert [step for step, _, _ in order] == [6280, 6279, 6294, 6293]
    assert order[0] == (6280, {"sum-6280"}, 855)
    # Within one round the newest step wins; two checksums for one step are both reported.
    same = local_tier.ranked([{5: ("x", 9), 4: ("y", 9)}, {5: ("z", 9), 6: (None, 9)}], None)
    assert same == [(6, set(), 9), (5, {"x", "z"}, 9), (4, {"y"}, 9)]


def test_steps_older_than_the_services_newest_are_left_out() -> None:
    held = [{10: ("a", 3), 12: ("b", 3)}]
    assert [s for s, _, _ in local_tier.ranked(held, (3, 11))] == [12]
    assert [s for s, _, _ in local_tier.ranked(held, (3, 12))] == [12]  # a tie: local is read
    assert local_tier.ranked(held, (4, 1)) == []  # the service's round is newer


def test_a_steps_round_is_recorded_beside_it(tmp_path: Path) -> None:
    folder = local_tier.step_dir(tmp_path, 3)
    assert local_tier.round_of(folder) == 0  # none recorded: older than any round
    local_tier.mark_round(folder, 60766960855)
    assert local_tier.round_of(folder) == 60766960855
