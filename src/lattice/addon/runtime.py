"""The addon inside a training process: discovery, step boundaries, snapshots, restore.

A step is counted by the (first) optimizer's post-step hook; the step *boundary* is the moment
the loop asks its DataLoader for the next batch (so scaler updates and per-step scheduler calls
made after ``optimizer.step()`` are included). Snapshots are copied on the training thread and
written by a background thread to the node-local tier.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import copy
import errno
import gc
import logging
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from lattice.addon import (
    accel,
    collective,
    data,
    failed_step,
    hf,
    lightning,
    local_tier,
    loops,
    patches,
    policy,
    protocol,
    replica,
    script_tensors,
    service_tier,
    settings,
    sharded,
    signals,
    state,
    stateful,
)
from lattice.addon import shadows as shadows_
from lattice.addon.protocol import say
from lattice.common import node_local

log = logging.getLogger("lattice.addon")

KEEP = 2  # node-local steps, the one being written included: the tier is memory (/dev/shm)
# A checkpoint's key: taken at the optimizer hook, right after an update (no DataLoader pass
# open), so a restore without a DataLoader replays its step (`restore_at_first_step`).
AFTER_UPDATE = "after_update"
CLOSING = "closing_optimizer"  # which optimizer's step ends an iteration (`Runtime._closes`)
STREAMS = "streams"  # each rank's IterableDataset states, by loader (`data.stream`)
CONTROL_POLL_S = 0.05
# Modules that wrap the user's model: the model inside is saved, so a checkpoint's keys do
# not depend on them (a run restarted without torch.compile, or on one process, still loads).
WRAPPERS = {
    "DistributedDataParallel",
    "DataParallel",
    "FullyShardedDataParallel",
    "OptimizedModule",
}


@dataclass
class _Upload:
    """What a snapshot's upload sends: files of its step folder, the RNG states (rank 0), and
    whether to commit it right after (``commit``) or to commit an earlier step first
    (``later``: a sharded step that every rank has uploaded)."""

    names: list[str]
    rngs: list[Any] | None
    commit: bool = False
    later: dict[str, Any] | None = None


class Runtime:
    """One per process; created by `activate`."""

    def __init__(self, root: Path, control: str | None, every: tuple[str, float]) -> None:
        self.root = root
        round_env = os.environ.get(protocol.ENV_ROUND, "")
        # The rendezvous round (generation) this process trains in: checkpoints are ordered by
        # it before their step (see local_tier.ranked).
        self.generation = int(round_env) if round_env.isdigit() else 0
        self.control = control
        self.mode, self.every = every
        self.interval = int(self.every) if self.mode == "steps" else 1
        self.optimizers: list[weakref.ref[torch.optim.Optimizer]] = []
        self._inner: set[int] | None = None  # `_wrapped`'s answer since the last making
        self.schedulers: list[weakref.ref[Any]] = []
        self.scalers: list[weakref.ref[Any]] = []
        self.averaged: list[weakref.ref[Any]] = []  # swa_utils.AveragedModel (SWA / EMA)
        self.emas: list[weakref.ref[Any]] = []  # EMAs kept as bare tensors (shadows.TRACKED)
        self.loaders: list[weakref.ref[DataLoader]] = []
        self.loader_sites: dict[str, int] = {}  # DataLoaders made at each site (`data.site`)
        self.registered: dict[str, Any] = {}
        self.trainer: weakref.ref[Any] | None = None  # a transformers.Trainer inside train()
        self.trainer_checkpoint: dict[str, Any] | None = None  # restored, for Trainer to load
        # (optimizers, copies, models, shadows) of the last `gc` scan (`_scan`)
        self._models_cache: (
            tuple[tuple[int, ...], int, list[weakref.ref[nn.Module]], list[shadows_.Ref]] | None
        ) = None
        self.copies = 0  # modules deep-copied or unpickled so far (`module_copied`)
        self.scan_s = 0.0  # time spent in `gc` scans
        self.started = time.monotonic()
        self.shadow_labels: set[str] = set()  # shadows announced
        self.step = 0
        self.step_base = 0  # the step this process started from (restored), for calibration
        self.settled = False  # calibration: the first snapshots' writes have been waited for
        self.calibrated = False
        self.pending = False
        self.open_passes: dict[int, data.LoaderTrack] = {}  # id → loaders mid-pass right now
        self.restore_done = False
        self.loading = False  # optimizer steps taken while loading state are not steps
        self.replaying = False  # the optimizer step the restore happened in (no DataLoader)
        self.replay_due = False  # restored without a DataLoader: the next step is the replay
        self.replay_tried = False  # a replay restore was tried (it is, once)
        # Optimizers stepped one after another in an iteration (a GAN's): the ids stepped since
        # the anchor's last step, and the one that steps last (`note_step`).
        self.cycle: list[int] = []
        self.anchor: int | None = None  # the optimizer that stepped first
        self.closing: int | None = None
        self.replay_closing = 0  # the checkpoint's closing optimizer, by creation order
        self.deferred = False  # the replay restore waits for the closing optimizer's step
        self.replay_rng: list[Any] | None = None  # the restored RNG states, for the replay
        # The newest checkpoint, read by a replay restore that was not for it: the first
        # DataLoader pass restores it without reading it again (`restore`).
        self.stash: tuple[int, dict[str, Any], str] | None = None
        self.suppress_scheduler = False
        self.rng_to_restore: dict[str, Any] | None = None
        self.resume_positions: list[data.Position] = []
        self.rng_inner_due = False  # the resumed pass's RNG waits for its inner DataLoader
        self.generator_to_restore: Callable[[], None] | None = None  # its sampler's generator
        self.loops = loops.LoopState()  # the script's step counters and range loops
        self.tensors = script_tensors.ScriptTensors()  # the script's batches (nanoGPT's X, Y)
        self.replay_tensors: list[dict[str, Any]] = []  # restored, set at the replay
        self._owned: set[int] | None = None  # see `_recorded_tensors`
        self.loops_due = False  # restored counters to set at the next batch fetch
        self.force = False
        self.last_control = 0.0
        self.last_boundary: float | None = None
        self.step_times: collections.deque[float] = collections.deque(maxlen=policy.RECENT_STEPS)
        self.last_snapshot = 0  # the step of the newest snapshot (auto and seconds modes)
        self.cost_s = 0.0  # what one checkpoint costs, as calibration counts it
        self.stalls: list[float] = []
        self.write_s: list[float] = []
        # What each upload to the checkpoint service cost this node beside the write: its CPU
        # seconds (reading, hashing, sending), or its whole time when the service runs on this
        # machine and does its own hashing and storing on the same cores. Without a service,
        # the CPU seconds of sending pieces to the next node and storing the ones received.
        self.upload_s: list[float] = []
        # One snapshot waits at most: when the writer falls behind, the next snapshot waits
        # (back-pressure) instead of the node-local tier lagging further and further.
        self.queue: queue.Queue[tuple[int, dict[str, Any], _Upload | None]] = queue.Queue(1)
        # Steps whose snapshot is queued or being written, oldest first.
        self._written = threading.Condition()
        self.writing: list[int] = []
        self.waits: list[float] = []  # the durability gate's waits (see `_gate`)
        self.service = service_tier.ServiceTier.from_env()
        self.writer = threading.Thread(target=self._write_loop, name="lattice-ckpt", daemon=True)
        self.writer.start()
        # Uploads run on their own thread and only the newest written step is uploaded: a
        # slow or restarting checkpoint service never holds back the node-local tier.
        self._uploads = threading.Condition()
        self._upload_next: tuple[int, Path, _Upload] | None = None
        self._uploading = False
        self._claimed = False  # a sharded upload decided, its write not yet done
        self.uploaded: tuple[int, dict[str, Any]] | None = None  # step, shards: last upload
        self.committed = -1  # the newest step this process committed
        # Without a service, a sharded model's pieces also go to the next node (replica.py);
        # decided at the first sharded snapshot.
        self.ring: replica.Ring | None = None
        self._ring_decided = False
        # The last step boundary, for saving that step when the next one fails (failed_step.py).
        self.kept: failed_step.Boundary | None = None
        self.rng_records: failed_step.RngRecords | None = None
        self._sharded: tuple[tuple[int, ...], bool] | None = None  # models' ids → any sharded
        self.keep_s: collections.deque[float] = collections.deque(maxlen=16)
        self.keep_off = False
        self.record_s = 0.0  # what `_record_rng` cost after this step
        self.rng_after_step: bytes | None = None  # what it recorded
        self.rng_settled = False  # a step's record has been its boundary's, and always was
        self.rng_drifts = False  # a step's record was not its boundary's
        self.term_at_boundary = False  # SIGTERM came between a step and its boundary
        self.ending = False  # an uncaught exception is ending the script
        self.term_pending = False  # SIGTERM came while a failed step was being saved
        self.buffer_copies = failed_step.BufferCopies()
        self.optimizer_steps = 0  # by any optimizer: a second one may step before the first
        self.stepping = False  # inside an optimizer's step: parameters are half updated
        self.in_boundary = False  # inside `boundary`: its own state is half updated
        self.pid = os.getpid()  # a DataLoader worker forked from this process is not it
        if self.service is not None:
            threading.Thread(target=self._upload_loop, name="lattice-upload", daemon=True).start()

    # identity ----------------------------------------------------------------------------
    @staticmethod
    def rank() -> int:
        dist = collective.dist()
        return dist.get_rank() if dist else int(os.environ.get("RANK", "0"))

    @staticmethod
    def world() -> int:
        return collective.world()

    @staticmethod
    def local_rank() -> int:
        return int(os.environ.get("LOCAL_RANK", "0"))

    # discovery ---------------------------------------------------------------------------
    def _alive(self, refs: list[weakref.ref[Any]]) -> list[Any]:
        return [obj for obj in (ref() for ref in refs) if obj is not None]

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers, less one another wraps: ``ZeroRedundancyOptimizer``'s local one
        (made in its ``__init__``, holding this rank's shard), whose state is part of the
        wrapper's; tracked apart, it was saved from one rank and loaded into another's."""
        live = self._alive(self.optimizers)
        inner = self._wrapped()
        return [opt for opt in live if id(opt) not in inner] if inner else live

    def _wrapped(self) -> set[int]:
        """The ids of the inner optimizers, found again only after one was made (a
        wrapper makes its inner one in its ``__init__``, or lazily: that too is a making)."""
        if self._inner is None:
            self._inner = {
                id(o.optim)
                for o in self._alive(self.optimizers)
                if hasattr(o, "consolidate_state_dict") and hasattr(o, "optim")
            }
        return self._inner

    def optimizer_made(self) -> None:
        self._inner = None

    def wrapped(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer`` is one another steps (`_optimizers`): its hooks are not steps."""
        return id(optimizer) in self._wrapped()

    def models(self) -> list[nn.Module]:
        """Top-level modules owning the optimizers' parameters (DDP/FSDP wrappers unwrapped).

        Found by a `gc` scan, cached until the set of optimizers changes.
        """
        return self._scan()[0]

    def shadows(self) -> list[shadows_.Shadow]:
        """Copies of the models that no optimizer steps (an EMA: see shadows.py)."""
        return self._scan()[1]

    def module_copied(self) -> None:
        """A module was deep-copied or unpickled: maybe a new shadow (`shadows.patch_copies`)."""
        self.copies += 1

    def _scan(self) -> tuple[list[nn.Module], list[shadows_.Shadow]]:
        key = tuple(id(obj) for obj in (*self._optimizers(), *self._alive(self.emas)))
        cached = self._models_cache
        if cached is not None and cached[0] == key:
            # A module copied since: scanned again, within a share of the time (a script may
            # deep-copy one every step: a scan is 30 ms for a small heap).
            fresh = cached[1] == self.copies or (
                self.scan_s > policy.SCAN_SHARE * (time.monotonic() - self.started)
            )
            found = [ref() for ref in cached[2]]
            shadows = shadows_.alive(cached[3])
            if fresh and shadows is not None and all(m is not None for m in found):
                return found, shadows  # type: ignore[return-value]
        t0 = time.monotonic()
        copies = self.copies
        models, shadows = self._find_models()
        self.scan_s += time.monotonic() - t0
        self._models_cache = (
            key,
            copies,
            [weakref.ref(m) for m in models],
            shadows_.refs(shadows),
        )
        for shadow in shadows:
            if shadow.label not in self.shadow_labels:
                self.shadow_labels.add(shadow.label)
                say(f"saving {shadow.label}: weights of a model that no optimizer steps (an EMA?)")
        return models, shadows

    def _find_models(self) -> tuple[list[nn.Module], list[shadows_.Shadow]]:
        order: dict[int, tuple[int, int]] = {}
        for oi, opt in enumerate(self._optimizers()):
            pi = 0
            for group in opt.param_groups:
                for p in group["params"]:
                    order.setdefault(id(p), (oi, pi))
                    pi += 1
        if not order:
            return [], []
        owners = []
        # By type, not isinstance: that reads ``obj.__class__``, which a dead weakref.proxy
        # (torch.compile leaves some) raises ReferenceError for, and a lazy module warns for.
        candidates = [
            obj
            for obj in gc.get_objects()
            if issubclass(type(obj), nn.Module) and "_parameters" in obj.__dict__
        ]  # not a half-built one (its __init__ raised before Module's): it has no parameters
        for obj in candidates:
            if type(obj).__name__ not in WRAPPERS:
                keys = [order[id(p)] for p in obj.parameters() if id(p) in order]
                if keys:
                    owners.append((obj, min(keys)))
        children = {id(c) for m, _ in owners for c in m.modules() if c is not m}
        roots = [(m, k) for m, k in owners if id(m) not in children]
        models = [m for m, _ in sorted(roots, key=lambda mk: mk[1])]
        if self.trainer is not None or any(sharded.is_sharded(m) for m in models):
            return models, []  # Trainer saves its own; a sharded copy is not looked for
        averaged, emas = self._alive(self.averaged), self._alive(self.emas)
        return models, shadows_.find(candidates, models, set(order), averaged, emas)

    def objects(self, saving: bool = True) -> dict[str, Any]:
        """What a checkpoint holds, by name. ``saving``: model copies never written in place
        are left out (`shadows.moved`); a restore loads into all."""
        found: dict[str, Any] = {}
        trainer = self.trainer() if self.trainer is not None else None
        if trainer is not None:  # Trainer's own objects, under its own names (see hf.py)
            found.update(hf.objects(trainer))
            for name, obj in self.registered.items():
                found[f"user.{name}"] = obj
            return found
        for i, m in enumerate(self.models()):
            found[f"model.{i}"] = m
        for i, opt in enumerate(self._optimizers()):
            found[f"optimizer.{i}"] = opt
        for kind, refs in (
            ("scheduler", self.schedulers),
            ("scaler", self.scalers),
            ("averaged", self.averaged),
        ):
            for i, obj in enumerate(self._alive(refs)):
                found[f"{kind}.{i}"] = obj
        copies = [s for s in self.shadows() if not saving or shadows_.moved(s)]
        found.update(shadows_.state_objects(copies))
        for name, obj in self.registered.items():
            found[f"user.{name}"] = obj
        return found

    def _stream_states(self) -> list[Any]:
        """Each tracked loader's stream state where the loop stands (`LoaderTrack.stream_state`)."""
        return [tr.stream_state(ld) for ld, tr in self.tracks()]

    def tracks(self) -> list[tuple[DataLoader, data.LoaderTrack]]:
        return [(ld, ld._lattice_track) for ld in self._alive(self.loaders)]  # type: ignore[attr-defined]

    # step boundary -----------------------------------------------------------------------
    def note_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Learn which optimizer steps last in an iteration: the one stepped last before the
        one that stepped first in this process (not the first created: a GAN may create the
        generator's first and step the discriminator's first) steps again."""
        if self.loading:
            return
        if self.anchor is None:
            self.anchor = id(optimizer)
        if id(optimizer) == self.anchor:
            if self.cycle:
                self.closing = self.cycle[-1]
            self.cycle = []
        self.cycle.append(id(optimizer))

    def _closes(self, optimizer: torch.optim.Optimizer, live: list[Any]) -> bool:
        """Whether ``optimizer``'s step ends the iteration (where a script that draws its own
        batches has its boundary): with several optimizers, once it is known which steps last
        (until then no boundary: one after the first optimizer would cut an iteration)."""
        return len(live) == 1 or self.closing == id(optimizer)

    def closing_index(self) -> int:
        """The closing optimizer's place in creation order (0 until it is known)."""
        live = self._optimizers()
        return next((i for i, opt in enumerate(live) if id(opt) == self.closing), 0)

    def on_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.loading:
            return
        live = self._optimizers()
        if not live:
            return
        if self.trainer is not None:  # Trainer's on_step_end is the boundary
            if live[0] is optimizer:
                self.step += 1
                self.pending = True
                self._record_rng()
            return
        if live[0] is optimizer:
            self.step += 1
            for track in self.open_passes.values():
                track.mark_step()
            self.pending = True
            if self.open_passes:
                self._record_rng()
        if not self.open_passes and self.pending and self._closes(optimizer, live):
            # The script made this batch itself: the end of its iteration is the boundary.
            self.loops.fetched(sys._getframe(), None)
            self.tensors.stepped(sys._getframe())
            self.boundary()

    def boundary(self) -> None:
        """Called before each batch fetch: checkpoint / safe point for a step just finished."""
        if not self.pending:
            return
        self.in_boundary = True
        try:
            self._boundary()
        finally:
            self.in_boundary = False

    def _boundary(self) -> None:
        self.pending = False
        self._keep_boundary()  # first: what follows may fail in a collective
        if self.term_at_boundary:
            self.in_boundary = False  # its state is whole: what follows is not run
            self.save_failed_step()
            signals.die_of_sigterm(self)
        now = time.perf_counter()
        if self.last_boundary is not None:
            self.step_times.append(now - self.last_boundary)
        stop = self._safepoint_requested()
        if stop:
            signals.hold_sigterm()
            self.snapshot(sync=True)
            signals.flush_output()
            say(f"safe point at step {self.step}: checkpointed, exiting {protocol.SAFEPOINT_EXIT}")
            os._exit(protocol.SAFEPOINT_EXIT)
        made = self.step - self.step_base  # steps made by this process
        if self.mode != "steps" and not self.calibrated:
            if made >= 3 and not self.settled:
                # Step times for calibration are taken with no write or upload in flight (on
                # CPU they compete for the cores): wait once for the first snapshots'.
                self.settled = True
                self.flush()
                self.step_times.clear()
            if made >= policy.CALIBRATION_STEPS:
                self._calibrate()
        if self.force or self._due():
            self.force = False
            if self.mode == "auto" and not self.calibrated and len(self.stalls) == 1:
                # The second snapshot is the one calibration trusts: let the first one's write
                # give its buffers back (pinned host memory on a GPU) so this one reuses them.
                self.queue.join()
            self.snapshot(sync=False)
        self._gate()
        self.last_boundary = time.perf_counter()

    def _gate(self) -> None:
        """Before the next step runs, the snapshot taken ``interval`` steps before it is on disk.

        A step's gradients are reduced over every rank before any rank finishes it, so when any
        rank has finished step K, every rank has passed this gate for it: every snapshot up to
        K - interval is in its node's tier. A kill -9 then loses at most ``2 * interval - 1``
        steps, one step with a checkpoint every step (the write of step K - 1 had overlapped step
        K otherwise, and a kill in between lost two). With a longer interval the write has had
        ``interval - 1`` steps to finish and this does not wait.
        """
        due = self.step + 1 - self.interval
        with self._written:
            if not self.writing or self.writing[0] > due:
                return
            t0 = time.perf_counter()
            self._written.wait_for(lambda: not self.writing or self.writing[0] > due)
        self.waits.append(time.perf_counter() - t0)

    def _keeping(self) -> bool:
        """Whether steps are kept for failures (failed_step.py) in this process, now."""
        if self.keep_off:
            return False
        if any(hasattr(opt, "consolidate_state_dict") for opt in self._optimizers()):
            return False  # ZeroRedundancyOptimizer: a dead rank's optimizer shard dies with it
        models = self.models()
        key = tuple(id(m) for m in models)
        if self._sharded is None or self._sharded[0] != key:
            self._sharded = (key, any(sharded.is_sharded(m) for m in models))
        return not self._sharded[1]  # a rank's pieces die with it: only a checkpoint has them

    def _record_rng(self) -> None:
        """This rank's RNG state as the step just taken left it, for a restart of this rank if
        it dies before the boundary (`_keep` tells whether that state is the boundary's)."""
        self.rng_after_step = None
        if not self._keeping():
            return
        t0 = time.perf_counter()
        blob = failed_step.pack_rng()
        self._write_rng(blob, exact=self.rng_settled)
        self.rng_after_step = blob
        self.record_s = time.perf_counter() - t0

    def _write_rng(self, blob: bytes, exact: bool, tensors: bytes = b"") -> None:
        rank = self.rank()
        if self.rng_records is None or self.rng_records.rank != rank:
            self.rng_records = failed_step.RngRecords(self.root, rank)
        streams = failed_step.encode_streams(self._stream_states())
        payload = failed_step.join_record(blob, tensors, streams)
        self.rng_records.write(self.generation, self.step, self.world(), payload, exact)

    def _recorded_tensors(self) -> bytes:
        """This rank's script tensors for its record of an after-update boundary (a dead
        rank's are only there). Storages of the models and optimizers are looked up again
        every `loops.EVERY_FETCH` steps: they do not move once training runs."""
        if not self.tensors.varying:
            return b""
        if self._owned is None or self.step % loops.EVERY_FETCH == 0:
            self._owned = script_tensors.owned_storages(self.models(), self._optimizers())
        return self.tensors.record(sys._getframe(), self._owned)

    def _keep_boundary(self) -> None:
        """What saving this step needs if the next one fails (failed_step.py): 100-200 µs
        with `_record_rng` on an idle machine.

        Not kept where that is more than `policy.KEEP_MAX_SHARE` of a step (a toy model's 1 ms
        steps): such a job checkpoints often anyway.
        """
        self.kept = None
        if not self._keeping():
            return
        t0 = time.perf_counter()
        self._keep()
        self.keep_s.append(time.perf_counter() - t0 + self.record_s)
        self.record_s = 0.0
        full = len(self.keep_s) == self.keep_s.maxlen
        if full and self.step % 64 == 0 and len(self.step_times) >= policy.CALIBRATION_STEPS:
            cost, step_s = policy.median(self.keep_s), policy.median(self.step_times)
            if cost > policy.KEEP_MAX_SHARE * step_s:
                self.keep_off, self.kept = True, None
                say(
                    f"not keeping steps for failures: {cost * 1e6:.0f} µs of a "
                    f"{step_s * 1e3:.1f} ms step; a kill -9 loses up to the checkpoint interval"
                )

    def _keep(self) -> None:
        """The boundary's state; its RNG state is recorded unless the step's record holds it
        already. Once a step's record is seen to differ from its boundary's (the script draws
        random numbers in between), no record taken after a step counts as exact again."""
        blob = failed_step.pack_rng()
        after_step, self.rng_after_step = self.rng_after_step, None
        if after_step is not None and blob != after_step:
            self.rng_drifts = True
        after_update = self._after_update()
        if blob != after_step or not self.rng_settled:
            tensors = self._recorded_tensors() if after_update else b""
            self._write_rng(blob, exact=True, tensors=tensors)
        self.rng_settled = after_step is not None and not self.rng_drifts
        self.buffer_copies.keep(failed_step.buffers(self.models()))
        states = {}
        if after_update:  # what the script steps after the update changes these: copy them
            for kind, refs in (("scheduler", self.schedulers), ("scaler", self.scalers)):
                for i, obj in enumerate(self._alive(refs)):  # named as `objects` names them
                    states[f"{kind}.{i}"] = copy.deepcopy(obj.state_dict())
        for name, obj in self.registered.items():
            # Anything may change a registered object between the boundary and a failure:
            # its state is copied here (its cost counts against keeping, `_keep_boundary`).
            states[f"user.{name}"] = state.detached_copy(obj.state_dict())
        self.kept = failed_step.Boundary(
            step=self.step,
            generation=self.generation,
            world=self.world(),
            positions=[tr.position(ld) for ld, tr in self.tracks()],
            loops=self.loops.capture(sys._getframe()),
            schedulers=self._scheduler_steps(after_update),
            versions=self._versions(after_update),
            optimizer_steps=self.optimizer_steps,
            after_update=after_update,
            states=states,
        )

    def _after_update(self) -> bool:
        """Whether the boundary is the optimizer hook: no DataLoader pass was open during the
        step (the script made its batch itself), and no Trainer."""
        return self.trainer is None and not self.open_passes

    def _scheduler_steps(self, after_update: bool) -> list[int]:
        """The schedulers' positions, which must not move between a boundary and its save
        (after an update, their kept states are saved instead: nothing to compare)."""
        return [] if after_update else [s.last_epoch for s in self._alive(self.schedulers)]

    def _versions(self, after_update: bool) -> list[int]:
        scalers = [] if after_update else self._alive(self.scalers)
        copies = shadows_.tensors(self.shadows())
        return failed_step.versions(self._alive(self.averaged), scalers, copies)

    def _keep_share(self, step_s: float) -> float:
        """What keeping boundaries costs each step, as a share of it (0 when not kept)."""
        if self.keep_off or not self.keep_s:
            return 0.0
        return policy.median(self.keep_s) / step_s

    def defer_to_boundary(self) -> bool:
        """SIGTERM between a step and its boundary: the step's state is newer than the kept
        boundary's and not yet whole (a scheduler may step next). Let the step run on to its
        boundary and save that; every rank's record of this step is there (`_record_rng`)."""
        if self.ending:
            return False  # no boundary comes: the script is ending with an exception
        if self.pending and self.rng_after_step is not None and not self.in_boundary:
            self.term_at_boundary = True
        return self.term_at_boundary

    def save_failed_step(self) -> None:
        """The step before the one that failed, from this process's live state (failed_step.py).

        Only when nothing changed since its boundary but what the boundary kept: no optimizer
        step, no scheduler step, no buffer written in place (a BatchNorm forward is).
        """
        kept = self.kept
        if kept is None or self.pending or kept.step != self.step or os.getpid() != self.pid:
            return
        if self.stepping or self.in_boundary or kept.optimizer_steps != self.optimizer_steps:
            return  # a step or a boundary was cut in half
        if kept.schedulers != self._scheduler_steps(kept.after_update) or (
            kept.versions != self._versions(kept.after_update)
        ):
            say(f"step {kept.step} not saved after the failure: state changed since its end")
            return
        folder = local_tier.step_dir(self.root, kept.step)
        with self._written:
            if kept.step in self.writing or local_tier.recorded(folder / "state.pt"):
                return  # its checkpoint is written (or being written: the exit flush waits)
        copies = self.buffer_copies.by_identity(failed_step.buffers(self.models()))
        if copies is None:
            say(f"step {kept.step} not saved after the failure: the models' buffers changed")
            return
        with signals.sigterm_recorded(self), signals.saving(self):  # the agent stops the
            self._room_for(kept.step)  # survivors: finish, and say so
            self._write_failed_step(kept, folder, copies)

    def _room_for(self, step: int) -> None:
        """Before a failed-step save, as `_write` does before a snapshot: the write in flight
        ends, then the oldest step goes (three copies of a large state in a memory-backed tier,
        as a failure strains the node). If the write does not end in time, nothing goes: the
        step it replaces may be the only whole one."""
        with self._written:
            ended = self._written.wait_for(
                lambda: not self.writing, timeout=signals.TERM_WRITE_WAIT_S
            )
        if ended:
            local_tier.prune(self.root, KEEP - 1, below=step)

    def _write_failed_step(
        self, kept: failed_step.Boundary, folder: Path, copies: dict[int, torch.Tensor]
    ) -> None:
        t0 = time.perf_counter()
        replicated: dict[str, Any] = {
            "step": kept.step,
            "world": kept.world,
            "rngs": [],
            failed_step.KEY: True,
        }
        for name, obj in self.objects().items():
            if name in kept.states:
                replicated[name] = kept.states[name]  # as the boundary left them
            elif isinstance(obj, nn.Module):
                live = obj.state_dict(keep_vars=True)
                for key, value in live.items():  # the buffers as the boundary left them
                    live[key] = copies.get(id(value), value)
                replicated[name] = state.detached_copy(live)
            else:
                replicated[name] = state.detached_copy(obj.state_dict())
        replicated["loaders"] = [p.to_state() for p in kept.positions]
        replicated["loops"] = kept.loops
        replicated[AFTER_UPDATE] = kept.after_update
        replicated[CLOSING] = self.closing_index()
        local_tier.mark_round(folder, kept.generation)
        local_tier.save(folder / "state.pt", replicated)
        say(
            f"the round failed after step {kept.step}: saved it "
            f"({time.perf_counter() - t0:.2f} s); only the step in flight is lost"
        )

    def _due(self) -> bool:
        if self.mode != "steps" and not self.calibrated:
            # Two snapshots before calibrating: the first pays one-time costs (allocation,
            # lazy imports: 92 ms against 0.3 ms warm for a tiny model), the second is typical.
            return len(self.stalls) < policy.CALIBRATION_SNAPSHOTS
        if self.mode == "steps":
            return self.step % self.interval == 0
        return self.step - self.last_snapshot >= self.interval

    def _proposal(self) -> int:
        """The interval that the costs measured since calibration ask for (auto mode; 0
        otherwise): the mean of the last snapshots' stall and write against the median step.

        Calibration sees the first snapshots only; a write that turns out slower (page cache
        pressure, a busier machine) would otherwise overrun the budget for the whole run (a
        50M-parameter run on 2 cores was sized for 3.3 % and cost 4 %).
        """
        if self.mode != "auto" or not self.calibrated:
            return 0
        stalls = self.stalls[1:][-policy.RECENT_SNAPSHOTS :] or self.stalls
        writes = self.write_s[1:][-policy.RECENT_SNAPSHOTS :] or self.write_s
        if not stalls or not writes:
            return self.interval
        times = sorted(self.step_times)
        step_s = max(times[len(times) // 2] if times else 1.0, 1e-9)
        uploads = self.upload_s[-policy.RECENT_SNAPSHOTS :]
        cost = (
            policy.mean(stalls) + policy.mean(writes) + (policy.mean(uploads) if uploads else 0.0)
        )
        return policy.steps_for(cost, step_s, self._keep_share(step_s))

    def _calibrate(self) -> None:
        times = self.step_times
        step_s = max(sum(times) / len(times) if times else 1.0, 1e-9)
        # The background write counts whole: on a CPU it competes for the cores, on a GPU it
        # holds the GIL for parts of torch.save (measuring the slowdown instead was tried:
        # steps timed beside a write on an H200 looked unslowed, yet that interval cost 54 %).
        # An upload counts by its CPU time: waiting on the network or a remote service costs
        # training nothing, reading, hashing and sending the bytes compete like the write.
        stall, write, upload = map(policy.typical, (self.stalls, self.write_s, self.upload_s))
        self.cost_s = stall + write + upload
        if self.mode == "seconds":
            interval = max(1, round(self.every / step_s))
        else:
            interval = policy.steps_for(self.cost_s, step_s, self._keep_share(step_s))
        dist = collective.dist()
        if dist is not None and dist.get_world_size() > 1:
            interval = collective.all_max(dist, interval)
        self.interval = interval
        self.calibrated = True
        say(
            f"checkpoint every {interval} steps (step {step_s * 1e3:.1f} ms, stall "
            f"{stall * 1e3:.1f} ms, write {write * 1e3:.1f} ms"
            + (f", upload {upload * 1e3:.1f} ms" if self.upload_s else "")
            + (f"; {policy.median(self.keep_s) * 1e6:.0f} µs a step kept" if self.keep_s else "")
            + ")"
        )

    def _safepoint_requested(self) -> bool:
        if not self.control:
            return False
        local = 0
        now = time.monotonic()
        if now - self.last_control >= CONTROL_POLL_S:
            self.last_control = now
            try:
                text = Path(self.control).read_text()
            except OSError:
                text = ""
            local = int(protocol.CHECKPOINT_AND_EXIT in text)
        dist = collective.dist()
        if dist is not None and dist.get_world_size() > 1:
            local = collective.all_max(dist, local)
        return bool(local)

    # snapshot ----------------------------------------------------------------------------
    def snapshot(self, sync: bool) -> None:
        t0 = time.perf_counter()
        objects = self.objects()
        # A sharded (FSDP) model: each rank keeps its own pieces (no gather, see sharded.py).
        local = sharded.local_states(objects)
        # Every rank's RNG goes into each node's state file: a node whose processes get other
        # ranks in the next round (a node before it left) still restores from its own tier.
        # With pieces to upload, the ranks' upload reports travel along (see `_coordinate`).
        after_update = self._after_update()
        tensors = self._script_tensors() if after_update else []
        mine = (
            state.capture_rng(),
            *self._upload_report(local is not None),
            self._proposal(),
            tensors,
            self._stream_states(),
            self.local_rank() == 0,
        )
        dist = collective.dist()
        gathered = collective.everyone(dist, mine)
        self._consolidate([rank for rank, g in enumerate(gathered) if g[6]])
        rngs = [g[0] for g in gathered]
        self.last_snapshot = self.step
        proposed = max(g[3] for g in gathered)  # the same on every rank
        if proposed:
            if abs(proposed - self.interval) > self.interval // 4:
                say(f"checkpoint every {proposed} steps (was {self.interval}: measured costs)")
            self.interval = proposed
        if local is not None and not self._ring_decided:
            self._ring_decided = True  # every rank: the first sharded snapshot is collective
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
            if dist is not None and replica.wanted(self.world(), local_world, bool(self.service)):
                self.ring = replica.Ring(dist, self.rank(), self.world(), local_world)
        files: dict[str, Any] = {}
        if self.local_rank() == 0:
            replicated: dict[str, Any] = {"step": self.step, "world": self.world(), "rngs": rngs}
            for name, obj in objects.items():
                if local is not None and name in local[0]:
                    replicated[name] = local[0][name]  # a skeleton: the pieces are apart
                else:
                    replicated[name] = state.detached_copy(obj.state_dict())
            if local is not None:
                replicated[sharded.KEY] = {"names": sorted(local[0]), "world": self.world()}
            replicated["loaders"] = [tr.position(ld).to_state() for ld, tr in self.tracks()]
            replicated["loops"] = self.loops.capture(sys._getframe())
            replicated[AFTER_UPDATE] = after_update
            replicated[CLOSING] = self.closing_index()
            if any(g[4] for g in gathered):
                replicated[script_tensors.KEY] = [g[4] for g in gathered]
            if any(state is not None for g in gathered for state in g[5]):
                replicated[STREAMS] = [g[5] for g in gathered]  # each rank's (`data.stream`)
            files["state"] = replicated
        if local is not None:
            files[sharded.shard_name(self.rank(), self.world())] = local[1]
        upload = self._coordinate(gathered, sync) if local is not None else None
        if local is None and self.rank() == 0 and self.service is not None:
            upload = _Upload(["state"], rngs, commit=True)  # committed at once, newest wins
        with self._written:
            self.writing.append(self.step)
        self.queue.put((self.step, files, upload))  # blocks while the writer is behind
        self.stalls.append(time.perf_counter() - t0)
        if sync:
            self.flush()
            if local is not None:
                self._commit_pieces(dist)

    def _script_tensors(self) -> list[dict[str, Any]]:
        """This rank's batch tensors in the script's frames (script_tensors.py)."""
        if not self.tensors.varying:
            return []
        owned = script_tensors.owned_storages(self.models(), self._optimizers())
        return self.tensors.capture(sys._getframe(), owned)

    def _upload_report(self, pieces: bool) -> tuple[Any, bool]:
        """(this rank's last finished upload, whether one is in flight) for `_coordinate`."""
        if not pieces or self.service is None:
            return None, False
        with self._uploads:
            busy = self._claimed or self._uploading or self._upload_next is not None
            return self.uploaded, busy

    def _coordinate(self, gathered: list[Any], sync: bool) -> _Upload | None:
        """Which upload this snapshot starts, the same decision on every rank.

        A sharded checkpoint is on the service once every rank's pieces are: all ranks upload
        the same steps, one at a time (a step is taken when no rank is still uploading), and
        rank 0 commits a step when the snapshot after it hears that every rank has uploaded
        it (what each uploaded travels with the RNG states this gather collects anyway).
        """
        if self.service is None or not (sync or not any(g[2] for g in gathered)):
            return None
        commit: dict[str, Any] | None = None
        reports = [g[1] for g in gathered]
        if self.rank() == 0 and all(r is not None for r in reports):
            steps = {r[0] for r in reports}
            if len(steps) == 1 and next(iter(steps)) > self.committed:
                commit = {
                    "step": steps.pop(),
                    "shards": {k: v for r in reports for k, v in r[1].items()},
                }
        with self._uploads:
            self._claimed = True
        names = [sharded.shard_name(self.rank(), self.world())]
        if self.rank() == 0:
            return _Upload(["state", *names], [g[0] for g in gathered], later=commit)
        return _Upload(names, None)

    def _commit_pieces(self, dist: Any) -> None:
        """After a safe point's upload: rank 0 commits it when every rank has uploaded it."""
        if self.service is None:
            return
        reports = collective.everyone(dist, self.uploaded)
        if self.rank() != 0 or any(r is None or r[0] != self.step for r in reports):
            return
        shards = {k: v for r in reports for k, v in r[1].items()}
        try:
            self.service.commit(self.step, shards, self.world(), self.generation)
            self.committed = self.step
        except Exception as exc:
            say(f"checkpoint commit of step {self.step} failed: {exc!r}")

    def flush(self) -> None:
        """Wait until every snapshot taken is written, and the newest one uploaded."""
        self.queue.join()
        with self._uploads:
            self._uploads.wait_for(lambda: self._upload_next is None and not self._uploading)

    def _write_loop(self) -> None:
        while True:
            item = self.queue.get()
            step, piece = item[0], None
            sharded_step = any(sharded.parse_shard_name(name) for name in item[1])
            try:
                piece = self._write(*item)
            except Exception as exc:  # a failed write must not kill training
                say(f"checkpoint write failed: {exc!r}{self._full_hint(exc)}")
                with self._uploads:  # its upload will not come: others may start
                    self._claimed = False
            finally:
                with self._written:  # ended, written or not: the gate must not wait forever
                    with contextlib.suppress(ValueError):
                        self.writing.remove(step)
                    self._written.notify_all()
                # Let go of the snapshot before saying it is written: a GPU snapshot's pinned
                # buffers go back to torch's host cache, and the next snapshot reuses them.
                del item
                if sharded_step and self.ring is not None:
                    self._replicate(step, piece)  # after the gate opened: training goes on
                self.queue.task_done()

    def _replicate(self, step: int, piece: Path | None) -> None:
        """This rank's pieces of ``step`` to the next node, the previous node's here."""
        assert self.ring is not None
        cpu0 = time.thread_time()
        try:
            got = self.ring.exchange(piece)
            if got is not None:
                name = sharded.shard_name(self.ring.source, self.world())
                folder = local_tier.step_dir(self.root, step)
                # Not into a step pruned meanwhile (a newer one was written): nothing to keep.
                with contextlib.suppress(FileNotFoundError):
                    if folder.is_dir():
                        local_tier.store(folder / f"{name}.pt", *got)
            self.upload_s.append(time.thread_time() - cpu0)
        except Exception as exc:  # the ring is out of step or a peer is gone: stop using it
            say(f"replicating the pieces of step {step} to the next node failed: {exc!r}")
            self.ring = None

    def _write(self, step: int, files: dict[str, Any], upload: _Upload | None) -> Path | None:
        """Write a snapshot's files to the node-local tier; this rank's piece file, if any."""
        t0 = time.perf_counter()
        folder = local_tier.step_dir(self.root, step)
        if "state" in files:
            # Room first: a third copy of the state beside the two kept would count against a
            # memory-backed /dev/shm's limit (a pod's) while it is written.
            local_tier.prune(self.root, KEEP - 1, below=step)
            local_tier.mark_round(folder, self.generation)
        for name, obj in files.items():
            local_tier.save(folder / f"{name}.pt", obj)
        if "state" in files:
            local_tier.prune(self.root, KEEP)
        self.write_s.append(time.perf_counter() - t0)
        if upload is not None and self.service is not None:
            with self._uploads:  # replaces a step still waiting: the newest wins
                self._upload_next = (step, folder, upload)
                self._claimed = False
                self._uploads.notify_all()
        mine = sharded.shard_name(self.rank(), self.world())
        return folder / f"{mine}.pt" if mine in files else None

    def _full_hint(self, exc: Exception) -> str:
        """What to do when the node-local tier is full: the upload to the checkpoint service
        reads the files written there, so the job has no new checkpoint anywhere."""
        if not isinstance(exc, OSError) or exc.errno != errno.ENOSPC:
            return ""
        return (
            f"; the node-local tier {self.root} is full and nothing is uploaded either: give "
            f"it room (a larger memory volume at /dev/shm, or {node_local.ENV_ROOT} on a disk)"
        )

    def _upload_loop(self) -> None:
        assert self.service is not None
        while True:
            with self._uploads:
                self._uploads.wait_for(lambda: self._upload_next is not None)
                assert self._upload_next is not None
                step, folder, upload = self._upload_next
                self._upload_next, self._uploading = None, True
            done = None
            cpu0, wall0 = time.thread_time(), time.perf_counter()
            try:
                if upload.later is not None:  # a sharded step every rank has uploaded
                    later = upload.later
                    self.service.commit(
                        later["step"], later["shards"], self.world(), self.generation
                    )
                    self.committed = later["step"]
                # The bytes written to the node-local tier: no second serialisation.
                shards = self.service.put(step, folder, upload.names, upload.rngs)
                if upload.commit:
                    self.service.commit(step, shards, len(upload.rngs or []), self.generation)
                done = (step, shards)
                if self.service.colocated:
                    self.upload_s.append(time.perf_counter() - wall0)
                else:
                    self.upload_s.append(time.thread_time() - cpu0)
            except FileNotFoundError:
                pass  # pruned: a newer step was written meanwhile, and is offered next
            except Exception as exc:  # a failed upload must not kill training
                say(f"checkpoint upload of step {step} failed: {exc!r}")
            finally:
                with self._uploads:
                    if done is not None:
                        self.uploaded = done
                    self._uploading = False
                    self._uploads.notify_all()

    # restore -----------------------------------------------------------------------------
    def _valid(self, step: int) -> dict[str, Any] | None:
        try:
            path = local_tier.step_dir(self.root, step) / "state.pt"
            return self._unpack(local_tier.load(path))
        except (OSError, local_tier.CorruptFile, RuntimeError, KeyError, EOFError) as exc:
            say(f"checkpoint at step {step} unusable ({exc}); trying the previous one")
            return None

    def _unpack(self, replicated: dict[str, Any]) -> dict[str, Any]:
        rngs = replicated.pop("rngs", [])
        rng = rngs[self.rank()] if self.rank() < len(rngs) else None
        return {"state": replicated, "rng": rng}

    def restore(self, after_update_only: bool = False, stepping: int | None = None) -> bool:
        """Load the newest checkpoint every rank has, once, before the first batch (True if
        one was).

        ``after_update_only`` (a replay: `restore_at_first_step`, `restore_at_loop_start`): only
        a checkpoint taken right after an update, outside any DataLoader pass that made steps.
        Any other is kept as read (`stash`) for the first DataLoader pass, where it belongs.
        ``stepping``: the optimizer (by creation order) in whose step this is; a checkpoint
        whose iteration ends with another's is kept as read for that one's step.
        """
        self.restore_done = True
        newest, self.stash = self.stash or self._newest(), None
        if newest is None:
            return False
        step, got, origin = newest
        replicated = got["state"]
        positions = [data.Position.from_state(raw) for raw in replicated.get("loaders", [])]
        self._take_streams(positions, replicated.get(STREAMS) or [], got.get(STREAMS) or [])
        # The pass(es) the checkpoint was taken in: the training loop resumes there.
        training = [p for p in positions if p.had_steps(p.pass_index)]
        if after_update_only and (training or not replicated.get(AFTER_UPDATE)):
            self.restore_done, self.stash = False, newest
            return False
        closing = int(replicated.get(CLOSING, 0))
        if stepping is not None and stepping != closing:
            # An earlier optimizer of the iteration: a graph of a later one may still need the
            # parameters (a GAN's fake batch), which loading them in place would break.
            self.restore_done, self.stash, self.deferred = False, newest, True
            return False
        self.replay_closing = closing
        self.step = self.step_base = step
        if hf.STATE_KEY in replicated:
            # Taken inside Trainer.train(): Trainer loads it itself when train() starts (hf.py).
            self.trainer_checkpoint = got
            self._prune_newer(step)
            say(f"restored step {step} from {origin} (transformers.Trainer resumes from it)")
            return True
        objects = self.objects(saving=False)
        self.loading = True  # loading a sharded optimizer steps it once with lr 0
        try:
            held, holders = got.get("pieces") or ({}, {})
            loaded = sharded.load(objects, replicated, held, holders, collective.dist())
        finally:
            self.loading = False
        for name, obj in objects.items():
            if name.startswith(shadows_.PREFIX):
                shadows_.load(name, obj, replicated)
            elif name in replicated and name not in loaded:
                obj.load_state_dict(replicated[name])
        for name in replicated:
            if name.startswith(shadows_.PREFIX) and name not in objects:
                say(
                    f"{name[len(shadows_.PREFIX) :]} is in the checkpoint, not in this run yet: "
                    "not restored (a copy made later in the script starts over)"
                )
        self.resume_positions = positions
        for _loader, tr in self.tracks():
            position = data.matching(tr, positions)
            if position is not None:
                tr.take_resume(position)
        # Passes before the checkpoint's that made steps are fast-forwarded (their scheduler
        # steps suppressed), the others (evaluation, a peeked batch) run again; the RNG is
        # restored at the checkpoint's pass.
        self.suppress_scheduler = any(p.pass_index > 0 or p.done for p in training)
        for line in self.loops.load(replicated.get("loops", [])):
            say(f"step loop not resumed, it counts from its start again: {line}")
        if self.loops.jump:
            # A step loop: its range calls resume it, and each loader's first pass is the
            # checkpoint's. Scheduler calls made before that pass are in the restored state.
            self.suppress_scheduler = True
        self.loops_due = not training
        ranks = replicated.get(script_tensors.KEY) or []
        self.replay_tensors = got.get(script_tensors.KEY) or (
            ranks[self.rank()] if self.rank() < len(ranks) else []
        )
        self.rng_to_restore, self.replay_rng = got["rng"], None
        if not training and got["rng"] is not None:
            state.restore_rng(got["rng"])
            self.rng_to_restore, self.replay_rng = None, got["rng"]
        self._prune_newer(step)
        say(f"restored step {step} from {origin}")
        return True

    def _consolidate(self, writers: list[int]) -> None:
        """A ``ZeroRedundancyOptimizer``'s state is spread over the ranks: every rank sends
        its shard to each rank that writes the replicated state (each node's local rank 0),
        one collective per writer, before they call its ``state_dict`` (which raises otherwise:
        such a script crashed at its first checkpoint). Its ``load_state_dict`` takes the whole
        state and keeps each rank's shard."""
        for opt in self._optimizers():
            if callable(getattr(opt, "consolidate_state_dict", None)):
                for rank in writers:
                    opt.consolidate_state_dict(to=rank)

    def _take_streams(
        self, positions: list[data.Position], streams: list[list[Any]], recorded: list[Any]
    ) -> None:
        """This rank's stream states into the positions, when the world size is the one they
        were saved at: a stream cannot be split again for another (its pass starts over).
        ``recorded``: this rank's from its record, for a step saved after a failure."""
        mine = recorded
        if len(streams) == self.world() and self.rank() < len(streams):
            mine = streams[self.rank()]
        for position, saved in zip(positions, mine, strict=False):
            position.stream = saved

    def _newest(self) -> tuple[int, dict[str, Any], str] | None:
        """(step, checkpoint, where from) of the newest checkpoint every rank can read."""
        dist = collective.dist()
        remote = self._service_step(dist)  # (round, step) of the service's newest
        step, local = self._agree_local(dist, newer_than=remote)
        if remote is not None and step is None:  # nothing local as new as the service's
            got = self._download(dist)
            if got is None:
                return None
            return int(got["state"]["step"]), got, "the checkpoint service"
        if step is not None and local is not None:
            return step, local, str(local_tier.step_dir(self.root, step))
        return None

    def pending_checkpoint(self) -> dict[str, Any] | None:
        """The replicated state a restore would load, or None (collective: every rank calls
        it). Read now and kept (`stash`) for that restore. For a framework's own resume
        argument (Lightning's ``ckpt_path``, Trainer's ``resume_from_checkpoint``): the newer
        of the two checkpoints is the one restored (`forgo_restore` where the framework's is)."""
        if self.restore_done:
            return None
        self.stash = self.stash or self._newest()
        return self.stash[1]["state"] if self.stash is not None else None

    @staticmethod
    def restores_own(ours: dict[str, Any] | None, mine: int | None, theirs: int | None) -> bool:
        """The rule between a framework's own resume checkpoint (at global step ``theirs``,
        None when it names none) and the addon's (``ours``, at ``mine``, None when taken
        outside that framework): the addon's when it is as new, or the framework's names none."""
        return ours is not None and (theirs is None or (mine is not None and mine >= theirs))

    def forgo_restore(self, why: str, step: int) -> None:
        """The framework resumes from a checkpoint of its own newer than the addon's, at
        ``step``: the steps count on from there, so that the checkpoints this run takes rank
        above the addon's older ones (a history the run left)."""
        self.restore_done, self.stash = True, None
        self.step = self.step_base = max(self.step, step)
        say(why)

    def restore_at_loop_start(self) -> None:
        """A ``for … in range(…)`` loop of the main script starts once an optimizer exists.
        If the newest checkpoint was taken right after an update with no DataLoader pass
        making steps (the script draws its own batches), restore now, so that this ``range``
        call resumes the loop at the checkpoint's iteration (`loops.LoopState.resume_range`);
        that iteration's optimizer step is the replay (`restore_at_first_step`). Any other
        checkpoint is left, as read, to the first DataLoader pass (an epoch loop's).

        Not in a loop that runs without gradients (`_evaluating`)."""
        if self.restore_done or self.replay_tried or self.trainer is not None or self.loading:
            return
        if self._optimizers() and not self._evaluating():
            self._restore_for_replay()

    @staticmethod
    def _evaluating() -> bool:
        """Whether gradients are off (``torch.no_grad``, ``inference_mode``): an evaluation,
        which a script often runs on one rank only (nanoGPT's ``estimate_loss``, on the master
        process, with a ``range`` loop). A restore is collective, so it waits for a point every
        rank reaches: restoring there hung the job (the other ranks were in their first
        step's gradient all-reduce)."""
        return not torch.is_grad_enabled()

    def restore_at_first_step(self, optimizer: torch.optim.Optimizer) -> None:
        """In the first optimizer step, for a script that iterated no DataLoader before it.

        Such a script draws its own batches (nanoGPT's ``get_batch``): no batch fetch marks a
        step's end, so its checkpoints are taken right after an update (the optimizer hook),
        and no fetch marks where to restore. Restore here (unless a ``range`` loop's start did
        already), after this step's forward and backward, before its update: the step becomes
        the replay of the checkpoint's. Its gradients are dropped (the update does nothing),
        it is not counted, the RNG and the script's counters are set to the checkpoint's;
        what the script does after ``optimizer.step()`` (a scheduler step, a scaler update,
        ``step += 1``) then runs as it did after the checkpoint's step. The restarted run's
        first batch, drawn before this, is the only one thrown away.

        With several optimizers stepped one after another (a GAN), the checkpoint was taken
        after the last one's step (`_closes`): the restore waits for that optimizer's step
        (the earlier ones step the fresh state, which the restore then replaces), or, made at
        a loop's start, drops every update of the replayed iteration up to that one's.
        """
        live = self._optimizers()
        index = next((i for i, opt in enumerate(live) if opt is optimizer), 0)
        if not (self.restore_done or self.replay_tried):
            self._restore_for_replay(index)
        if not self.replay_due:
            return
        for opt in live:
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = None
        self.replaying = True
        if index != self.replay_closing:
            return  # an earlier optimizer of the replayed iteration: its update is dropped too
        self.replay_due, self.pending = False, False
        if self.replay_rng is not None:  # set at the restore: again, if a loop's start did it
            state.restore_rng(self.replay_rng)
        if self.replay_tensors:
            done = self.tensors.apply(sys._getframe(), self.replay_tensors)
            self.replay_tensors = []
            say(f"restored the script's tensors: {', '.join(done) or 'none (frames differ)'}")
        if self.loops_due:
            self._apply_loops()

    def _restore_for_replay(self, stepping: int | None = None) -> None:
        self.replay_tried, self.deferred = True, False
        if not self.restore(after_update_only=True, stepping=stepping):
            # Nothing restored, a checkpoint for the first DataLoader pass, or one for a later
            # optimizer's step (`deferred`: tried again there, from the stash).
            self.replay_tried = not self.deferred
            return
        live = self._optimizers()
        if self.replay_closing < len(live):
            self.closing = id(live[self.replay_closing])
        self.replay_due = True
        self.suppress_scheduler = False  # no DataLoader pass made steps: none to resume

    def _prune_newer(self, step: int) -> None:
        if self.local_rank() == 0:
            for newer in local_tier.steps(self.root):
                if newer > step:
                    local_tier.prune_step(self.root, newer)

    def _agree_local(
        self, dist: Any, newer_than: local_tier.Key | None = None
    ) -> tuple[int | None, dict[str, Any] | None]:
        """The best node-local step any rank can read, and this rank's copy of it; only steps
        at least as new as the service's ``newer_than`` (an older one would not be used).

        Best is newest round, then newest step (`local_tier.ranked`). One step at a time (a
        600 MB state is read once, not once per kept step). Ranks whose node lacks the step (a
        new node, a node that was away) get its file from a rank that has it, over the process
        group: a replaced node restores as recent a step as the others, without the checkpoint
        service. A step that two histories wrote differs between nodes: it is not used.
        """
        mine = {
            s: (
                local_tier.recorded(local_tier.step_dir(self.root, s) / "state.pt"),
                local_tier.round_of(local_tier.step_dir(self.root, s)),
            )
            for s in local_tier.steps(self.root)
        }
        everyone = collective.everyone(dist, mine)
        candidates = local_tier.ranked(everyone, newer_than)
        for step, sums, generation in candidates:
            if len(sums) > 1:
                say(f"node-local checkpoints of step {step} differ between nodes; not used")
            if len(sums) != 1:
                continue
            summary = next(iter(sums))
            got = self._valid(step) if mine.get(step, (None, 0))[0] == summary else None
            usable = collective.everyone(dist, got is not None)
            if not any(usable):
                continue
            if not all(usable):
                got = self._share(dist, step, usable.index(True), summary, got, generation)
            assert got is not None
            if got["state"].get(failed_step.KEY):
                usable_rngs, got["rng"], got[script_tensors.KEY], got[STREAMS] = (
                    self._failed_step_rng(dist, step, generation, int(got["state"]["world"]))
                )
                if not usable_rngs:
                    continue
            if sharded.KEY in got["state"]:
                pieces = self._local_pieces(dist, step, got["state"][sharded.KEY]["world"])
                if pieces is None:
                    continue
                got["pieces"] = pieces
            return step, got
        if candidates:
            say("no node-local checkpoint step is usable on any rank")
        return None, None

    def _failed_step_rng(
        self, dist: Any, step: int, generation: int, old_world: int
    ) -> tuple[bool, dict[str, Any] | None, list[dict[str, Any]], list[Any]]:
        """(usable, this rank's RNG state, its script tensors, its streams' states) for a step
        saved after a failure (failed_step.py).

        Each old rank left its state in a record on its node; they are gathered from every node
        (and from the job's other node folders on each machine) and kept in the step's folder.
        Without the record of an old rank that a new rank takes over (its node is gone), the
        step is not used: the run would not be exact.
        """
        folder = local_tier.step_dir(self.root, step)
        mine = failed_step.machine_records(self.root, generation, step, old_world)
        mine.update(failed_step.kept_records(folder))
        found: dict[int, bytes] = {}
        for part in collective.everyone(dist, mine):
            found.update(part)
        missing = [r for r in range(min(old_world, self.world())) if r not in found]
        same_world = old_world == self.world()  # a stream cannot be split again for another
        if missing:
            say(
                f"step {step} was saved after a failure, but the RNG states of old rank(s) "
                f"{missing} are gone with their node; not used"
            )
            return False, None, [], []
        if self.local_rank() == 0:
            try:
                failed_step.keep_records(folder, found)
            except OSError as exc:
                say(f"could not keep the RNG states of step {step} with it: {exc}")
        if self.rank() not in found:
            return True, None, [], []
        rng, tensors, streams = failed_step.split_record(found[self.rank()])
        return (
            True,
            failed_step.unpack_rng(rng),
            script_tensors.ScriptTensors.decode(tensors),
            failed_step.decode_streams(streams) if same_world else [],
        )

    def _share(
        self,
        dist: Any,
        step: int,
        src: int,
        summary: str,
        got: dict[str, Any] | None,
        generation: int,
    ) -> dict[str, Any]:
        """Send rank ``src``'s file of ``step`` to every rank; those without a copy load it."""
        path = local_tier.step_dir(self.root, step) / "state.pt"
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        if self.rank() == src:
            payload = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
            size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
        else:
            size = torch.zeros(1, dtype=torch.int64, device=device)
        dist.broadcast(size, src=src)
        if self.rank() != src:
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
        buffer = payload.to(device)
        dist.broadcast(buffer, src=src)
        if got is not None:
            return got
        data = buffer.cpu().numpy()
        if self.local_rank() == 0:  # the node keeps it: a later restart here reads it locally
            local_tier.prune_step(self.root, step)
            local_tier.mark_round(path.parent, generation)
            local_tier.store(path, data, summary)
        say(f"node-local checkpoint of step {step} received from rank {src}")
        return self._unpack(local_tier.loads(data, summary))

    def _local_pieces(
        self, dist: Any, step: int, old_world: int
    ) -> tuple[dict[int, Any], dict[int, int]] | None:
        """The old ranks' piece files of a sharded ``step`` on the nodes: (those this rank
        reads, the rank that reads each), or None when one is missing or damaged everywhere.

        Each old rank's file is read by one rank whose node has it: by the same rank when it
        has (a restart at the same size reads nothing from another node), else spread evenly.
        A file that fails to load is read again from another node that has it (a replica,
        see replica.py), until none is left.
        """
        folder = local_tier.step_dir(self.root, step)
        names = {j: sharded.shard_name(j, old_world) for j in range(old_world)}
        present = {j: local_tier.recorded(folder / f"{n}.pt") for j, n in names.items()}
        mine = {j: summary for j, summary in present.items() if summary}
        everyone = collective.everyone(dist, mine)
        holders: dict[int, int] = {}
        load = [0] * len(everyone)
        failed: set[tuple[int, int]] = set()  # (rank, old rank) reads that failed
        held: dict[int, Any] = {}
        pending = list(range(old_world))
        while pending:
            for j in pending:
                having = [r for r, got in enumerate(everyone) if j in got and (r, j) not in failed]
                if not having or len({everyone[r][j] for r in having}) > 1:
                    lack = f"node-local pieces of step {step} are incomplete (old rank {j})"
                    say(f"{lack}; not used")
                    return None
                holder = j if j in having else min(having, key=lambda r: (load[r], r))
                holders[j] = holder
                load[holder] += 1
            mine_failed = []
            for j in pending:
                if holders[j] == self.rank():
                    try:
                        # Mapped: `sharded.load` copies the rows into place, once.
                        held[j] = local_tier.load(folder / f"{names[j]}.pt", mapped=True)
                    except (OSError, local_tier.CorruptFile, RuntimeError, EOFError) as exc:
                        say(f"node-local pieces of step {step} unusable ({exc})")
                        mine_failed.append(j)
            reports = collective.everyone(dist, mine_failed)
            failed |= {(r, j) for r, js in enumerate(reports) for j in js}
            pending = sorted({j for js in reports for j in js})
        return held, holders

    def _service_step(self, dist: Any) -> local_tier.Key | None:
        """(round, step) of the service's newest as rank 0 sees it, the same on every rank.

        Rank 0 first fences the job at this round: what it lists then stays what the ranks
        fetch (a node of an ended round can no longer commit a step over it).
        """
        if self.service is None:
            return None
        from lattice.checkpoint.errors import RoundSuperseded

        remote = None
        if self.rank() == 0:
            try:
                if self.generation:
                    self.service.fence(self.generation)
                remote = self.service.latest()
            except RoundSuperseded as exc:
                say(f"this round has ended, a newer one has started: {exc}")
            except Exception as exc:
                say(f"checkpoint service not usable for restore: {exc}")
        if dist is not None and dist.get_world_size() > 1:
            box = [remote]
            dist.broadcast_object_list(box, src=0)
            remote = box[0]
        return remote

    def _download(self, dist: Any) -> dict[str, Any] | None:
        """The newest checkpoint on the service that every rank can read (a collective)."""
        assert self.service is not None
        distributed = dist is not None and dist.get_world_size() > 1
        steps: list[Any] = [None]
        if self.rank() == 0:
            try:
                steps = [self.service.steps()]
            except Exception as exc:
                say(f"checkpoint service not usable for restore: {exc}")
        if distributed:
            dist.broadcast_object_list(steps, src=0)
        for step in steps[0] or []:
            got: dict[str, Any] | None = None
            try:
                got = self.service.fetch(step, self.rank(), self.world())
            except Exception as exc:
                say(f"checkpoint of step {step} on the service unusable ({exc})")
            if all(collective.everyone(dist, got is not None)):
                return got
        return None

    # transformers.Trainer (hf.py) ---------------------------------------------------------
    say = staticmethod(say)

    def trainer_resume(self, trainer: Any) -> Path | None:
        """Restore (once) and, when the checkpoint is a Trainer's, write Trainer's folder."""
        if not self.restore_done:
            self.restore()
        got, self.trainer_checkpoint = self.trainer_checkpoint, None
        if got is None:
            return None
        return hf.write_resume_folder(trainer, got, self.root / f".trainer-resume-{self.rank()}")

    def trainer_begin(self, trainer: Any) -> None:
        self.restore_done = True
        self.trainer = weakref.ref(trainer)
        self.kept = None  # a boundary kept outside Trainer is not one of its steps

    def save_after_failure(self) -> None:
        """An exception is ending the training (a peer died inside a collective): save the
        last finished step. Called by the excepthook, and by the ``Trainer.train`` wrapper
        while the objects are still Trainer's (the excepthook comes too late there)."""
        try:
            self.save_failed_step()
        except Exception as err:  # the script's own error is what the log must show
            say(f"saving the last finished step after the failure failed: {err!r}")

    def trainer_end(self) -> None:
        self.trainer = None
        self.kept = None  # its step is saved from Trainer's objects only (hf.py)

    def trainer_step_end(self, global_step: int, evaluating: bool) -> None:
        """Trainer's on_step_end: the step boundary while Trainer.train() runs."""
        self.step = global_step
        if evaluating:  # evaluation draws random numbers after this: the next step's end is it
            self.force = self.force or self._due()
            self.pending, self.kept = False, None  # a failure before then saves no step
            return
        self.pending = True
        self.boundary()

    # data loader -------------------------------------------------------------------------
    def loader_iter(self, loader: DataLoader, original: Any, counter: str | None = None) -> Any:
        """A pass of ``loader`` (``DataLoader.__iter__``). ``counter``: ``loader`` is an adapter
        that iterates a DataLoader lazily, counting its passes in that attribute (accel.py)."""
        if self.trainer is not None:
            return original(loader)  # Trainer's loop: its own data position (hf.py)
        if loader.__dict__.get(data.INNER):
            return self.inner_pass(original(loader))
        track: data.LoaderTrack | None = loader.__dict__.get("_lattice_track")
        if track is None:
            made_at = getattr(loader, data.SITE, None)  # an adapter's: its inner loader's
            track = data.LoaderTrack(index=len(self.loaders), counter=counter, site=made_at)
            loader._lattice_track = track  # type: ignore[attr-defined]
            self.loaders.append(weakref.ref(loader))
            position = data.matching(track, self.resume_positions)
            if position is not None:
                track.take_resume(position)
        if not self.restore_done and self._optimizers() and not self._evaluating():
            # Not before an optimizer exists: a batch peeked to size the model comes first.
            # Not in an evaluation pass: maybe one rank's only (`_evaluating`).
            self.restore()
        self.loops.observe(sys._getframe(), ("iter", track.index, track.passes))
        pass_index = track.passes
        resume = track.resume
        if resume is not None and resume.earlier:
            # Made before the checkpoint's loader at the same place: its steps are in the
            # restored state, and so are the scheduler steps after them.
            track.passes, track.done = pass_index + 1, True
            self.suppress_scheduler = True
            return iter(())
        if self.loops.jump and resume is not None and pass_index < resume.pass_index:
            pass_index = resume.pass_index  # a resumed step loop: straight to the checkpoint
        track.passes = pass_index + 1
        track.yielded, track.base, track.shard_base, track.done, track.ahead = 0, 0, 0, False, 0
        if resume is None or pass_index > resume.pass_index or not resume.had_steps(pass_index):
            # A pass after the restored point, or one that made no step (evaluation, a peeked
            # batch): it runs as it did the first time.
            if resume is not None and pass_index >= resume.pass_index:
                track.resume = None
            return self._counting(original(loader), track, loader)
        at_checkpoint = pass_index == resume.pass_index
        if at_checkpoint:
            track.resume = None
            self.suppress_scheduler = False
            self.loops_due = True
            if track.counter is not None and resume.counter is not None:
                setattr(loader, track.counter, resume.counter)
            # Set with the RNG: at once for a pass that had ended, else once its iterator is made.
            self.generator_to_restore = data.generator_state(loader, resume)
        if not at_checkpoint or resume.done:
            # Its steps are in the restored state: the loop sees no batch of it.
            track.done = True
            if at_checkpoint:
                data.end_pass(loader, resume)
                self._restore_rng()
            return iter(())
        start, note = data.arm_skip(loader, resume)
        if note is not None:
            say(note)
        track.base = start or 0
        track.shard_base = (resume.shard or 0) if start is not None else 0
        iterator = original(loader)
        if track.counter is None or start is None:
            # After the iterator drew its order: the checkpoint's state. (A pass started over
            # has no batch to wait for: a dispatcher's inner loader runs on one rank only.)
            self._restore_rng()
        else:
            self.rng_inner_due = True  # the adapter's DataLoader is iterated later (inner_pass)
        return self._counting(iterator, track, loader)

    def inner_pass(self, iterator: Any) -> Any:
        """A pass of the DataLoader inside an adapter (accel.py): not counted (the adapter's
        passes are). In the resumed pass, the RNG is restored after the first batch, before
        the next is fetched: the uninterrupted run had fetched that one before the checkpoint
        (the adapter iterates one batch ahead)."""
        due, self.rng_inner_due = self.rng_inner_due, False
        for batch in iterator:
            yield batch
            if due:
                due = False
                self._restore_rng()
        if due:
            self._restore_rng()

    def _apply_loops(self) -> None:
        self.loops_due = False
        done, missed = self.loops.apply(sys._getframe())
        if done:
            say(f"restored the script's counters: {', '.join(done)}")
        if missed:
            say(f"step loop not resumed (it started before the restore): {', '.join(missed)}")

    def _restore_rng(self) -> None:
        if self.rng_to_restore is not None:
            state.restore_rng(self.rng_to_restore)
            self.rng_to_restore = None
        if self.generator_to_restore is not None:
            self.generator_to_restore()
            self.generator_to_restore = None

    def close_pass(self, loader: Any) -> None:
        """The loop is done with ``loader``'s current pass though it neither exhausted it nor
        let go of its iterator (Lightning's evaluation loop stops by count and keeps it):
        steps made from now on are not that pass's (`LoaderTrack.mark_step`)."""
        track = getattr(loader, "_lattice_track", None)
        if track is not None:
            self._close(track)

    def _close(self, track: data.LoaderTrack) -> None:
        if self.open_passes.get(id(track)) is track:
            del self.open_passes[id(track)]

    def _counting(self, iterator: Any, track: data.LoaderTrack, loader: Any) -> Any:
        self.open_passes[id(track)] = track
        passes = track.passes
        pass_key = (id(track), passes)
        read_ahead = bool(loader.__dict__.get(data.READ_AHEAD))
        track.streams = [(track.yielded, data.stream_state(loader))] if read_ahead else None
        try:
            while True:
                if self.loops_due:
                    self._apply_loops()
                self.loops.fetched(sys._getframe(), pass_key)
                self.boundary()
                try:
                    batch = next(iterator)
                except StopIteration:
                    track.done = True
                    return
                track.yielded += 1
                track.record_stream(loader)
                yield batch
        finally:  # exhausted, or the loop let go of it (break, a peek with next())
            if track.passes == passes:  # (not a later pass's, started since)
                self._close(track)


_RUNTIME: Runtime | None = None


def current() -> Runtime | None:
    return _RUNTIME


def activate() -> Runtime | None:
    """Patch torch for this process (idempotent); None when the environment says not to."""
    global _RUNTIME
    if _RUNTIME is not None:
        return _RUNTIME
    if not settings.autopatch_enabled(dict(os.environ)):
        return None
    job = os.environ[protocol.ENV_JOB]
    default_root = node_local.tier_root() / job / "standalone"  # no agent set it
    root = Path(os.environ.get(protocol.ENV_LOCAL_DIR) or default_root)
    every = settings.parse_every(os.environ.get(protocol.ENV_EVERY))
    rt = Runtime(root, os.environ.get(protocol.ENV_CONTROL_FILE), every)
    _RUNTIME = rt
    patches.patch_torch(rt)
    main = sys.modules.get("__main__")
    if main is not None:
        rt.loops.on_loop_start = rt.restore_at_loop_start
        loops.install_range(main.__dict__, rt.loops)
    accel.install(rt)  # DataLoader semantics, part of the torch patching
    stateful.install(rt)
    shadows_.install(rt)
    lightning.install(rt)  # Lightning steers by counters of its own: part of torch's
    if "transformers" in settings.autopatch_parts(dict(os.environ)):
        hf.install(rt)
    atexit.register(patches.yield_to_collectives)  # atexit runs the last registered first: after
    atexit.register(rt.flush)  # let in-flight writes and the last upload finish at the end
    signals.on_uncaught(rt)
    signals.on_sigterm(rt)
    return rt
