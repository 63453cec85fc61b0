"""The script's batch tensors: which locals are saved, and putting them back at the replay."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from torch import nn

from lattice.addon import script_tensors
from lattice.addon.script_tensors import ScriptTensors


class Script:
    """A training loop shaped like nanoGPT's: the next batch is drawn before the update."""

    def __init__(self) -> None:
        self.model = nn.Linear(2, 1)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.tensors = ScriptTensors()
        self.saved: list[dict[str, Any]] = []
        self.recorded = b""
        self.applied: list[str] = []

    def hook(self, capture: bool, restore: list[dict[str, Any]] | None) -> None:
        """Stands in for the optimizer hook (`Runtime.on_optimizer_step`)."""
        frame = sys._getframe(1)
        if restore is not None:
            self.applied = ScriptTensors.apply(frame, restore)
            return
        self.tensors.stepped(frame)
        if capture:
            owned = script_tensors.owned_storages([self.model], [self.opt])
            self.saved = self.tensors.capture(frame, owned)
            self.recorded = self.tensors.record(frame, owned)

    def run(self, steps: int, capture_at: int = -1, restore: Any = None) -> list[torch.Tensor]:
        data = torch.arange(10.0)  # the dataset in memory: never reassigned, never saved
        best = torch.tensor(float("inf"))
        x = data[:2]
        seen = []
        for i in range(steps):
            loss = self.model(x).sum()  # needs a gradient: not a batch
            weight = self.model.weight.detach()  # the model's storage: not a batch
            x = torch.full((2,), float(i + 1))  # the next batch, drawn before the update
            if i == 1:
                best = loss.detach() + weight.sum() * 0  # an evaluation's best loss
            loss.backward()
            self.hook(i == capture_at, restore if i == 0 else None)
            seen.append(x.clone())
        assert best.numel() == 1 and data.numel() == 10
        return seen


def test_reassigned_batches_are_saved_and_put_back_at_the_same_instruction() -> None:
    first = Script()
    first.run(5, capture_at=3)
    (entry,) = first.saved
    assert set(entry["tensors"]) == {"x", "best"}  # not data, loss, weight
    assert torch.equal(entry["tensors"]["x"], torch.full((2,), 4.0))
    assert entry["devices"] == {"x": "cpu", "best": "cpu"}

    replay = Script()
    seen = replay.run(2, restore=first.saved)
    assert sorted(replay.applied) == ["best", "x"]
    assert torch.equal(seen[0], torch.full((2,), 4.0))  # the checkpoint's batch, not 1.0
    assert torch.equal(seen[1], torch.full((2,), 2.0))  # the loop goes on drawing its own


def test_a_tensor_goes_back_on_the_device_its_name_holds_now() -> None:
    """A rank that moved to another GPU of its node: not the device the tensor was saved from."""
    first = Script()
    first.run(4, capture_at=2)
    entry = dict(first.saved[0], devices={"x": "meta", "best": "meta"})
    replay = Script()
    seen = replay.run(1, restore=[entry])
    assert seen[0].device == torch.device("cpu")
    assert torch.equal(seen[0], torch.full((2,), 3.0))


def test_a_frame_at_another_instruction_gets_nothing() -> None:
    first = Script()
    first.run(4, capture_at=2)
    entry = dict(first.saved[0], at=first.saved[0]["at"] + 2)  # another call site
    replay = Script()
    seen = replay.run(1, restore=[entry])
    assert replay.applied == []
    assert torch.equal(seen[0], torch.full((2,), 1.0))


def test_tensors_over_the_bound_are_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(script_tensors, "MAX_BYTES", 10)  # room for x (8 bytes), not best too
    first = Script()
    first.run(4, capture_at=2)
    (entry,) = first.saved
    assert len(entry["tensors"]) == 1


def test_a_boundarys_record_gives_back_what_a_checkpoint_would() -> None:
    """A dead rank's tensors come from its node-local record (failed-step saves hold none)."""
    first = Script()
    first.run(5, capture_at=3)
    (entry,) = ScriptTensors.decode(first.recorded)
    (saved,) = first.saved
    assert (entry["code"], entry["at"], entry["devices"]) == (
        saved["code"],
        saved["at"],
        saved["devices"],
    )
    assert entry["tensors"].keys() == saved["tensors"].keys()
    for name, t in saved["tensors"].items():
        assert torch.equal(entry["tensors"][name], t) and entry["tensors"][name].dtype == t.dtype
    replay = Script()
    seen = replay.run(1, restore=[entry])
    assert torch.equal(seen[0], torch.full((2,), 4.0))


def _record_of(**tensors: torch.Tensor) -> bytes:
    """The record of a frame whose locals are ``tensors``, all of them varying."""
    st = ScriptTensors()
    frame = sys._getframe()
    frame.f_locals.update(tensors)
    st.varying[script_tensors.code_key(frame.f_code)] = set(tensors)
    return st.record(frame, set())


def test_records_keep_dtype_shape_and_values() -> None:
    wide = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    tensors = {
        "half": torch.randn(3, dtype=torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "ids": torch.randint(0, 50000, (2, 5)),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3, dtype=torch.int32),
        "strided": wide.t(),  # not contiguous
    }
    (entry,) = ScriptTensors.decode(_record_of(**tensors))
    for name, t in tensors.items():
        got = entry["tensors"][name]
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name


def test_nothing_is_recorded_off_the_cpu_or_over_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _record_of(x=torch.zeros(2, device="meta"), y=torch.zeros(2)) == b""
    monkeypatch.setattr(script_tensors, "RECORD_MAX_BYTES", 15)
    assert _record_of(x=torch.zeros(2), y=torch.zeros(2)) == b""  # 16 bytes
    assert ScriptTensors.decode(_record_of(x=torch.zeros(2), y=torch.zeros(1)))


@pytest.mark.parametrize(
    "blob", [b"", b"\x05\x00\x00\x00[{}]", b"\x02\x00\x00\x00[]extra", b"\xff" * 8]
)
def test_an_unreadable_record_gives_nothing(blob: bytes) -> None:
    assert ScriptTensors.decode(blob) == []  # never raises
    good = _record_of(x=torch.zeros(4))
    assert ScriptTensors.decode(good[:-4]) == []  # cut short
