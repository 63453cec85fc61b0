"""RNG records of failed_step.py: exact round trip, torn slots, the right step only."""

from __future__ import annotations

import io
import os
import random
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from lattice.addon import failed_step, signals, state
from lattice.addon.protocol import saving_marker


def draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_packed_rng_restores_every_generator_exactly() -> None:
    random.gauss(0, 1)  # a cached gaussian in python's and numpy's state
    np.random.standard_normal()
    blob = failed_step.pack_rng()
    expected = draws()
    draws()  # move on
    state.restore_rng(failed_step.unpack_rng(blob))
    assert draws() == expected


def test_packed_numpy_state_follows_every_draw_its_cached_gaussian_included() -> None:
    """The numpy part is reused while numpy's words stay put: a gaussian taken from the cache
    moves none of them, so a state holding one is never reused."""
    for draw in (
        lambda: None,
        lambda: np.random.standard_normal(),  # draws a pair: one cached
        lambda: np.random.standard_normal(),  # takes the cached one: no word moves
        lambda: np.random.rand(),
        lambda: None,
        lambda: np.random.seed(5),
    ):
        draw()
        blob = failed_step.pack_rng()
        expected = (np.random.standard_normal(), np.random.rand(), np.random.standard_normal())
        state.restore_rng(failed_step.unpack_rng(blob))
        assert (np.random.standard_normal(), np.random.rand(), np.random.standard_normal()) == (
            expected
        )
        state.restore_rng(failed_step.unpack_rng(blob))  # as it was, for the next draw


def test_records_keep_the_newest_two_steps_and_reject_a_torn_one(tmp_path: Path) -> None:
    records = failed_step.RngRecords(tmp_path, rank=3)
    for step in (7, 8, 9):
        records.write(generation=2, step=step, world=4, rng=f"rng{step}".encode(), exact=True)
    assert failed_step.read_records(tmp_path, 2, 9, 4) == {3: b"rng9"}
    assert failed_step.read_records(tmp_path, 2, 8, 4) == {3: b"rng8"}
    assert failed_step.read_records(tmp_path, 2, 7, 4) == {}  # overwritten
    assert failed_step.read_records(tmp_path, 1, 9, 4) == {}  # another round's step 9
    assert failed_step.read_records(tmp_path, 2, 9, 2) == {}  # another world's
    slot = tmp_path / failed_step.RNG_DIR / "rank-3.1"  # step 9's
    raw = bytearray(slot.read_bytes())
    raw[-1] ^= 0x01
    slot.write_bytes(bytes(raw))
    assert failed_step.read_records(tmp_path, 2, 9, 4) == {}
    assert failed_step.read_records(tmp_path, 2, 8, 4) == {3: b"rng8"}


def test_a_record_not_known_to_be_the_boundarys_is_not_used(tmp_path: Path) -> None:
    records = failed_step.RngRecords(tmp_path, rank=0)
    records.write(generation=1, step=4, world=2, rng=b"boundary-4", exact=True)
    records.write(generation=1, step=5, world=2, rng=b"after-step-5", exact=False)
    assert failed_step.read_records(tmp_path, 1, 5, 2) == {}
    assert failed_step.read_records(tmp_path, 1, 4, 2) == {0: b"boundary-4"}
    records.write(generation=1, step=5, world=2, rng=b"boundary-5", exact=True)  # same slot
    assert failed_step.read_records(tmp_path, 1, 5, 2) == {0: b"boundary-5"}


def test_records_kept_with_a_step_survive_the_live_files(tmp_path: Path) -> None:
    folder = tmp_path / "step-000000000005"
    folder.mkdir()
    failed_step.keep_records(folder, {0: b"a" * 10, 1: b"b" * 10})
    assert failed_step.kept_records(folder) == {0: b"a" * 10, 1: b"b" * 10}
    path = folder / failed_step.RNG_FILE
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert failed_step.kept_records(folder) == {}  # damaged: not trusted


def test_buffer_copies_are_the_boundarys() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model.register_buffer("mask", torch.ones(4))
    copies = failed_step.BufferCopies()
    copies.keep(failed_step.buffers([model]))
    names = [name for name, _ in model.named_buffers()]
    before = {name: b.clone() for name, b in model.named_buffers()}
    model(torch.randn(5, 3))  # running statistics move in place, their versions do not
    kept = copies.by_identity(failed_step.buffers([model]))
    assert kept is not None
    for name, buf in model.named_buffers():
        assert torch.equal(kept[id(buf)], before[name]), name
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])
    copies.keep(failed_step.buffers([model]))  # the next boundary
    assert torch.equal(copies.copies[names.index("1.running_mean")], model[1].running_mean)
    model[1].running_mean = torch.zeros(4)  # replaced, not written in place
    assert copies.by_identity(failed_step.buffers([model])) is None


def test_records_of_the_jobs_other_nodes_on_this_machine_are_found(tmp_path: Path) -> None:
    mine, gone = tmp_path / "node-b2", tmp_path / "node-b"
    failed_step.RngRecords(gone, rank=1).write(3, 10, 2, b"dead rank", exact=True)
    failed_step.RngRecords(mine, rank=0).write(3, 10, 2, b"mine", exact=True)
    failed_step.RngRecords(tmp_path / "node-c", rank=1).write(2, 10, 2, b"old round", exact=True)
    assert failed_step.machine_records(mine, 3, 10, 2) == {0: b"mine", 1: b"dead rank"}
    assert failed_step.read_records(mine, 3, 10, 2) == {0: b"mine"}


def test_a_constant_buffer_is_copied_once_a_norm_layers_statistics_every_time() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model.register_buffer("table", torch.arange(4.0))
    copies = failed_step.BufferCopies()
    copies.keep(failed_step.buffers([model]))
    model.table.data.fill_(7.0)  # through .data: no version bump, so not copied again
    model(torch.randn(5, 3))  # BatchNorm's statistics move, their versions do not
    copies.keep(failed_step.buffers([model]))
    kept = copies.by_identity(failed_step.buffers([model]))
    assert kept is not None
    assert torch.equal(kept[id(model.table)], torch.arange(4.0))
    assert torch.equal(kept[id(model[1].running_mean)], model[1].running_mean)
    model.table.add_(1.0)  # in place: its version moves, so it is copied again
    copies.keep(failed_step.buffers([model]))
    assert torch.equal(
        copies.by_identity(failed_step.buffers([model]))[id(model.table)], model.table
    )


def test_a_save_on_the_way_out_is_marked_for_the_agent(tmp_path: Path) -> None:
    """The marker the agent looks for (`protocol.saving_marker`) exists while the save runs."""
    rt: Any = SimpleNamespace(control=str(tmp_path / "round-1.control"))
    marker = saving_marker(rt.control, os.getpid())
    with signals.saving(rt):
        assert marker.exists()
    assert not marker.exists()
    rt.control = None  # not under an agent: nothing to mark
    with signals.saving(rt):
        assert not list(tmp_path.iterdir())


def test_lines_held_by_a_wrapping_excepthook_are_written_before_the_end(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.distributed's excepthook points sys.stderr at a buffer while ours runs; a process
    that dies in ours (`die_of_sigterm`) writes that buffer out first, or the failed-step
    save's line and the traceback are lost."""
    held = io.StringIO("lattice addon: the round failed after step 5: saved it\n")
    held.seek(0, io.SEEK_END)
    monkeypatch.setattr(sys, "stderr", held)
    signals.flush_output()
    assert "saved it" in capfd.readouterr().err
    assert held.getvalue() == ""


def test_a_records_parts_come_back_apart_and_stream_states_read_back_safely() -> None:
    states = [None, {"offset": 7, "shards": [1, 2], "name": "part-0"}]
    streams = failed_step.encode_streams(states)
    payload = failed_step.join_record(b"rng", b"tensors", streams)
    assert failed_step.split_record(payload) == (b"rng", b"tensors", streams)
    assert failed_step.decode_streams(streams) == states
    assert failed_step.split_record(failed_step.join_record(b"rng")) == (b"rng", b"", b"")
    assert failed_step.encode_streams([None, None]) == b""
    assert failed_step.decode_streams(b"") == []
    assert failed_step.decode_streams(streams[: len(streams) // 2]) == []  # torn: not used

    class Hostile:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("true",))

    buffer = io.BytesIO()
    torch.save([Hostile()], buffer)
    assert failed_step.decode_streams(buffer.getvalue()) == []  # weights_only: not unpickled
