"""The script's own batch tensors: what a replayed step cannot draw again.

nanoGPT draws the next batch inside a step (``X, Y = get_batch('train')`` right after the
forward), so when a step ends the script's locals already hold the next step's batch, drawn
from the RNG before the step's boundary recorded it. A restart replays the checkpoint's step
(`Runtime.restore_at_first_step`) and sets the RNG back, but ``X, Y`` then hold a batch the
restarted run drew: the run would be one batch off. So the tensors the script reassigns from
step to step (seen at the optimizer hooks, as `loops.LoopState` sees counters) are saved with
each checkpoint taken right after an update, per rank, and put back into the frames running
the same code at the same instruction when the replayed step ends.

Only tensors that need no gradient and share no storage with the models or the optimizers (a
batch, a best validation loss so far), up to `MAX_BYTES` per rank. A tensor the script never
reassigns (the whole dataset in memory) is not saved: the restarted run has it already.

A rank killed between checkpoints takes its tensors with it, so a failed-step save (saved by
the survivors) has none of its own: each rank also puts its tensors, when they are on the CPU
and small (`RECORD_MAX_BYTES`), into its node-local record of each boundary (`record`, beside
its RNG state, failed_step.py), from which a restart of that step takes them (`decode`). A GPU
batch is not recorded: copying it to the host at every step would stall the step.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from types import FrameType
from typing import Any

import torch
from torch import nn

from lattice.addon.loops import EVERY_FETCH, CodeKey, code_key, set_local, user_frames
from lattice.addon.protocol import say

KEY = "script_tensors"  # in a checkpoint's state: one list of frames per rank
MAX_BYTES = 64 << 20
RECORD_MAX_BYTES = 1 << 20  # per rank, copied into the node-local record at every boundary
_HEADER = struct.Struct("<I")


def _tensors(frame: FrameType) -> dict[str, torch.Tensor]:
    return {k: v for k, v in frame.f_locals.items() if isinstance(v, torch.Tensor)}


def owned_storages(models: Iterable[nn.Module], optimizers: Iterable[Any]) -> set[int]:
    """Storage addresses of the models' parameters and buffers and the optimizers' states:
    a script local that shares one (``w = model.weight.detach()``) is theirs, not a batch."""
    found = set()
    for model in models:
        for t in (*model.parameters(), *model.buffers()):
            found.add(t.untyped_storage().data_ptr())
    for opt in optimizers:
        for per_param in opt.state.values():
            for value in per_param.values():
                if isinstance(value, torch.Tensor):
                    found.add(value.untyped_storage().data_ptr())
    return found


class ScriptTensors:
    """Which tensor locals of the script change between steps, and saving / restoring them."""

    def __init__(self) -> None:
        self.last: dict[CodeKey, dict[str, int]] = {}  # name -> id() at the last observation
        self.varying: dict[CodeKey, set[str]] = {}
        self.steps = 0
        self.warned = False

    def stepped(self, start: FrameType | None) -> None:
        """An optimizer-hook boundary: observed when one of the first or one in `EVERY_FETCH`
        (reassignment is sticky, and a checkpoint observes anyway)."""
        self.steps += 1
        if self.steps <= EVERY_FETCH or self.steps % EVERY_FETCH == 0:
            self.observe(start)

    def observe(self, start: FrameType | None) -> None:
        for frame in user_frames(start):
            key = code_key(frame.f_code)
            now = {name: id(t) for name, t in _tensors(frame).items()}
            last = self.last.get(key)
            self.last[key] = now
            if last is not None:
                changed = {name for name, ident in now.items() if last.get(name, ident) != ident}
                if changed:
                    self.varying.setdefault(key, set()).update(changed)

    def _saved(
        self, start: FrameType | None, owned: set[int]
    ) -> list[tuple[FrameType, dict[str, torch.Tensor]]]:
        """The frames with tensors to save, and those tensors (see the module's docstring)."""
        found = []
        for frame in user_frames(start):
            varying = self.varying.get(code_key(frame.f_code))
            if not varying:
                continue
            tensors = {
                name: t
                for name, t in _tensors(frame).items()
                if name in varying
                and not t.requires_grad
                and not isinstance(t, nn.Parameter)
                and t.untyped_storage().data_ptr() not in owned
            }
            if tensors:
                found.append((frame, tensors))
        return found

    def record(self, start: FrameType | None, owned: set[int]) -> bytes:
        """This boundary's tensors as bytes for the node-local record (`decode` reads them);
        empty unless every one is on the CPU and all fit in `RECORD_MAX_BYTES`."""
        entries, parts, total = [], [], 0
        for frame, tensors in self._saved(start, owned):
            described = []
            for name, t in tensors.items():
                size = t.numel() * t.element_size()
                total += size
                if t.device.type != "cpu" or total > RECORD_MAX_BYTES:
                    return b""
                flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
                parts.append(flat.numpy().tobytes())
                described.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), size])
            entries.append(
                {"code": list(code_key(frame.f_code)), "at": frame.f_lasti, "tensors": described}
            )
        if not entries:
            return b""
        header = json.dumps(entries).encode()
        return _HEADER.pack(len(header)) + header + b"".join(parts)

    def capture(self, start: FrameType | None, owned: set[int]) -> list[dict[str, Any]]:
        """The varying tensors of the script's frames on the stack, copied to the CPU."""
        self.observe(start)
        saved, total = [], 0
        for frame, found in self._saved(start, owned):
            tensors, devices = {}, {}
            for name, t in found.items():
                size = t.numel() * t.element_size()
                if total + size > MAX_BYTES:
                    if not self.warned:
                        self.warned = True
                        say(f"script tensor {name} not checkpointed: over {MAX_BYTES >> 20} MiB")
                    continue
                total += size
                tensors[name] = t.detach().to("cpu", copy=True)
                devices[name] = str(t.device)
            if tensors:
                key = code_key(frame.f_code)
                saved.append(
                    {"code": list(key), "at": frame.f_lasti, "tensors": tensors, "devices": devices}
                )
        return saved

    @staticmethod
    def decode(blob: bytes) -> list[dict[str, Any]]:
        """`record`'s bytes as `capture` returns them (empty for empty or unreadable bytes:
        the record's CRC held, so only another version's record reads wrong)."""
        if not blob:
            return []
        try:
            (length,) = _HEADER.unpack_from(blob)
            at = _HEADER.size + length
            saved = []
            for entry in json.loads(blob[_HEADER.size : at]):
                tensors = {}
                for name, dtype_name, shape, size in entry["tensors"]:
                    dtype, end = getattr(torch, str(dtype_name), None), at + int(size)
                    if not isinstance(dtype, torch.dtype) or end > len(blob):
                        return []
                    raw = (
                        torch.frombuffer(bytearray(blob[at:end]), dtype=torch.uint8)
                        if end > at
                        else torch.empty(0, dtype=torch.uint8)
                    )
                    tensors[str(name)] = raw.view(dtype).reshape([int(n) for n in shape])
                    at = end
                devices = dict.fromkeys(tensors, "cpu")
                saved.append(
                    {
                        "code": entry["code"],
                        "at": int(entry["at"]),
                        "tensors": tensors,
                        "devices": devices,
                    }
                )
            return saved
        except (ValueError, KeyError, TypeError, RuntimeError, struct.error):
            return []

    @staticmethod
    def apply(start: FrameType | None, saved: list[dict[str, Any]]) -> list[str]:
        """Put saved tensors back into the frames running their code at their instruction, on
        the device of the tensor the name holds now (a rank may have moved to another GPU of
        its node in a resize), else on the one it was saved from."""
        by_place = {(tuple(e["code"]), int(e["at"])): e for e in saved}
        done = []
        for frame in user_frames(start):
            entry = by_place.pop((code_key(frame.f_code), frame.f_lasti), None)
            if entry is None:
                continue
            now = _tensors(frame)
            for name, t in entry["tensors"].items():
                device = now[name].device if name in now else entry["devices"].get(name, "cpu")
                set_local(frame, name, t.to(device))
                done.append(str(name))
        return done
