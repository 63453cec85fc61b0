"""PyTorch Lightning's ``Trainer.fit`` under the addon: Lightning's own loop counters.

Lightning's loop iterates the script's DataLoader (no batch read ahead for a sized one) and steps
torch optimizers and schedulers, so the generic tracking resumes the model, optimizers,
schedulers, RNG and data position of a ``Trainer.fit`` run. But Lightning also counts where it
stands, and steers by those counts: the batch index in the epoch (``training_step``'s
``batch_idx``, accumulation windows, a step-interval scheduler's frequency, validation every N
batches, and the epoch's end: an epoch-interval scheduler steps only when the count reaches the
loader's length), ``global_step`` (``max_steps``, logging, checkpoint callbacks). Restarted,
those counted from 0 in the resumed epoch: its scheduler step was lost, the run diverged.

So the training epoch loop's state (``state_dict()``: its progress counters and its children's,
plain numbers) is checkpointed with the rest (registered like `lattice.register`'s objects), and
set back where the resumed epoch hands out its first batch: in that epoch's first ``advance``,
after Lightning reset the epoch's counters for its start and before it reads the batch index.
Lightning's own ``load_state_dict`` is not used: it would mark the loops as restarting from a
Lightning checkpoint, a path with rules of its own (it restarts a plain DataLoader's epoch).

Lightning's evaluation loop also stops a pass by count and keeps its iterator: the pass stayed
open, the training steps after it were counted as made in it, and a restore took the
validation passes for training ones and skipped them (their DataLoaders' seeds, drawn from the
global RNG, then missing from the resumed run's RNG stream). Its passes are closed when it ends.

A loader without a length (an IterableDataset) is read a batch ahead by Lightning's fetcher (to
know the last batch): the position and a stream's state are taken that batch back
(`patch_fetcher`).

Both packagings are patched: ``lightning.pytorch`` and ``pytorch_lightning``.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from torch.utils.data import DataLoader

from lattice.addon import data, imports

PACKAGES = ("lightning.pytorch", "pytorch_lightning")
NAME = "lightning.epoch_loop"  # its name among the registered objects
COUNTERS = "_lattice_counters"  # the epoch loop's `Counters`, in its __dict__


class Counters:
    """A training epoch loop's counters as a checkpointable object."""

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.pending: dict[str, Any] | None = None  # restored, waiting for its epoch

    def state_dict(self) -> dict[str, Any]:
        trainer = self.loop.trainer
        callbacks = {}  # as Lightning's own checkpoint keeps them (`_call_callbacks_state_dict`)
        for callback in trainer.callbacks:
            if state := callback.state_dict():
                callbacks[callback.state_key] = state
        return {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,  # against a ``ckpt_path`` checkpoint's
            "loop": self.loop.state_dict(),
            "callbacks": callbacks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The callbacks' state at once (EarlyStopping's patience, ModelCheckpoint's best: no
        epoch hook runs before the checkpoint's epoch, `skipped`); the counters in that epoch."""
        self.pending = state
        saved = state.get("callbacks") or {}
        for callback in self.loop.trainer.callbacks:
            if callback.state_key in saved:
                callback.load_state_dict(copy.deepcopy(saved[callback.state_key]))

    def due(self) -> bool:
        return self.pending is not None and self.pending["epoch"] == self.loop.trainer.current_epoch

    def skipped(self) -> bool:
        """Whether Lightning is in an epoch before the checkpoint's: fast-forwarded by the addon
        (its DataLoader pass hands out no batch), its steps and hooks' effects are in the
        restored state."""
        return self.pending is not None and self.loop.trainer.current_epoch < self.pending["epoch"]

    def apply(self, data_fetcher: Any) -> None:
        """Set the checkpoint's counters; the fetcher counts the batches the resume skipped (it
        knows the epoch's last batch by count)."""
        assert self.pending is not None
        state, self.pending = self.pending["loop"], None
        _load(self.loop, state, "")
        progress = self.loop.batch_progress.current
        taken = self._taken()
        if taken is not None and taken != progress.ready:  # a resize: the epoch split anew
            progress.ready = progress.started = progress.processed = progress.completed = taken
        data_fetcher.fetched += progress.ready

    def _taken(self) -> int | None:
        """The batches of this epoch this rank counts as taken, in this world's terms: its
        loader's length less what the resumed pass hands it (None where not known: several
        training loaders, ``limit_train_batches``, a pass resumed by count)."""
        trainer = self.loop.trainer
        combined = trainer.fit_loop._combined_loader
        loaders = combined.flattened if combined is not None else []
        if len(loaders) != 1 or not isinstance(loaders[0], DataLoader):
            return None
        left = data.resumed_batches(loaders[0])
        total = trainer.num_training_batches
        if left is None or total != len(loaders[0]):
            return None
        return int(total) - left


def _load(loop: Any, state: dict[str, Any], prefix: str) -> None:
    """``_Loop.load_state_dict`` without its restarting marks (see the module's docstring)."""
    loop._load_from_state_dict(state, prefix)
    for key, child in vars(loop).items():
        if hasattr(child, "_load_from_state_dict") and hasattr(child, "on_save_checkpoint"):
            _load(child, state, f"{prefix}{key}.")


def patch(rt: Any, module: Any) -> None:
    """Wrap ``_TrainingEpochLoop.__init__`` (register its counters) and ``advance`` (idempotent)."""
    cls = module._TrainingEpochLoop
    if getattr(cls.advance, "_lattice", False):
        return
    init, advance = cls.__init__, cls.advance

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        counters = Counters(self)
        self.__dict__[COUNTERS] = counters
        rt.registered[NAME] = counters  # the latest Trainer's

    @functools.wraps(advance)
    def wrapped_advance(self: Any, data_fetcher: Any) -> Any:
        counters = self.__dict__.get(COUNTERS)
        if counters is not None and counters.due():
            counters.apply(data_fetcher)
        return advance(self, data_fetcher)

    wrapped_advance._lattice = True  # type: ignore[attr-defined]
    cls.__init__ = __init__
    cls.advance = wrapped_advance


def patch_evaluation(rt: Any, module: Any) -> None:
    """Wrap ``_EvaluationLoop.run`` (idempotent): it stops a pass by count and keeps its
    iterator, so the pass stayed open and the training steps after it were counted as made in
    it; a restore then took those validation passes for training ones and skipped them."""
    cls = module._EvaluationLoop
    run = cls.run
    if getattr(run, "_lattice", False):
        return

    @functools.wraps(run)
    def wrapped_run(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return run(self, *args, **kwargs)
        finally:
            combined = self._combined_loader
            for loader in combined.flattened if combined is not None else ():
                rt.close_pass(loader)

    wrapped_run._lattice = True  # type: ignore[attr-defined]
    cls.run = wrapped_run


def patch_resume(rt: Any, module: Any) -> None:
    """Wrap ``_CheckpointConnector.resume_start`` (idempotent): of a ``fit(ckpt_path=…)``
    checkpoint and the addon's, the newer is restored (see `choose`)."""
    cls = module._CheckpointConnector
    original = cls.resume_start
    if getattr(original, "_lattice", False):
        return

    @functools.wraps(original)
    def resume_start(self: Any, checkpoint_path: Any = None, *args: Any, **kwargs: Any) -> None:
        original(self, checkpoint_path, *args, **kwargs)
        if self._loaded_checkpoint and self.trainer.state.fn == "fit":
            choose(rt, self, checkpoint_path)

    resume_start._lattice = True  # type: ignore[attr-defined]
    cls.resume_start = resume_start


def choose(rt: Any, connector: Any, path: Any) -> None:
    """``fit(ckpt_path="last")`` is Lightning's documented resume: restarted, the script loads
    its own last checkpoint, older than the addon's (ModelCheckpoint saves every N steps or
    epochs) and, mid-epoch, inexact (a plain DataLoader's epoch starts over). Loaded over the
    addon's restore, the run went back to it and crashed. So Lightning's checkpoint is set
    aside when the addon's is as new (by global step); it is used where the addon has none (a
    new job resuming an older one's checkpoint) or an older one."""
    if rt.restore_done:  # restored (or not) at an earlier fit of this process: the script's
        return
    ours = rt.pending_checkpoint()  # collective: every rank is here
    theirs = int(connector._loaded_checkpoint.get("global_step", 0))
    if ours is None:
        why = "the addon has no checkpoint of this job"
        rt.forgo_restore(f"fit(ckpt_path={str(path)!r}): Lightning resumes from it ({why})", theirs)
        return
    mine = (ours.get(f"user.{NAME}") or {}).get("global_step")
    if not rt.restores_own(ours, mine, theirs):
        rt.forgo_restore(
            f"fit(ckpt_path={str(path)!r}) is at global step {theirs}, newer than the addon's "
            f"checkpoint ({'taken before fit' if mine is None else f'global step {mine}'}): "
            "Lightning resumes from it, the addon does not restore",
            theirs,
        )
        return
    connector._loaded_checkpoint, connector._ckpt_path = {}, None
    rt.say(
        f"fit(ckpt_path={str(path)!r}) not loaded: it is at global step {theirs}, the addon's "
        f"checkpoint at {mine} (restored instead)"
    )


def patch_fetcher(module: Any) -> None:
    """Wrap ``_PrefetchDataFetcher.__iter__`` and ``__next__`` (idempotent). For a loader
    without a length it reads a batch ahead of the loop (to know the last one): counted at the
    DataLoader, the data position and a stream's state ran a batch ahead of the steps, and a
    restore skipped that batch. The loaders' tracks are told how many batches the fetcher holds
    that no finished step took (`data.LoaderTrack.ahead`): the one popped for the step in
    flight and those still buffered, before a call (its fetch is a boundary); those buffered,
    after."""
    cls = module._PrefetchDataFetcher
    if getattr(cls.__next__, "_lattice", False):
        return
    iterate, fetch = cls.__iter__, cls.__next__

    def loaders(fetcher: Any) -> list[DataLoader]:
        combined = fetcher._combined_loader
        flat = combined.flattened if combined is not None else []
        return [ld for ld in flat if isinstance(ld, DataLoader)]

    def held(fetcher: Any, count: int) -> None:
        for loader in loaders(fetcher):
            track = loader.__dict__.get("_lattice_track")
            if track is not None:
                track.ahead = count

    @functools.wraps(iterate)
    def __iter__(self: Any) -> Any:
        if self.prefetch_batches and any(not _sized(ld) for ld in loaders(self)):
            for loader in loaders(self):  # the combined loader has no length: all read ahead
                loader.__dict__[data.READ_AHEAD] = True
        held(self, 0)
        out = iterate(self)
        held(self, len(self.batches))
        return out

    @functools.wraps(fetch)
    def __next__(self: Any) -> Any:
        held(self, len(self.batches))
        try:
            return fetch(self)
        finally:
            held(self, len(self.batches))

    __next__._lattice = True  # type: ignore[attr-defined]
    cls.__iter__, cls.__next__ = __iter__, __next__


def _sized(loader: DataLoader) -> bool:
    try:
        len(loader)
    except (TypeError, NotImplementedError):
        return False
    return True


EPOCH_HOOKS = ("on_train_epoch_start", "on_train_epoch_end")


def patch_hooks(module: Any) -> None:
    """Skip the epoch hooks of a fast-forwarded epoch (`Counters.skipped`), the module's and the
    callbacks': run on an epoch without batches, Lightning's own documented pattern
    (``torch.stack(self.training_step_outputs)`` in ``on_train_epoch_end``) raised, a
    ModelCheckpoint saved, an EarlyStopping checked a metric not logged yet (idempotent)."""
    for name in ("_call_callback_hooks", "_call_lightning_module_hook"):
        original = getattr(module, name)
        if getattr(original, "_lattice", False):
            continue

        def hook(trainer: Any, hook_name: str, *args: Any, _call: Any = original, **kw: Any) -> Any:
            if hook_name in EPOCH_HOOKS:
                counters = vars(trainer.fit_loop.epoch_loop).get(COUNTERS)
                if counters is not None and counters.skipped():
                    return None
            return _call(trainer, hook_name, *args, **kw)

        functools.update_wrapper(hook, original)
        hook._lattice = True  # type: ignore[attr-defined]
        setattr(module, name, hook)


def install(rt: Any) -> None:
    """Patch Lightning's loops and hook calls now where imported, else when they are."""
    for package in PACKAGES:
        for module, ready, patcher in (
            ("loops.training_epoch_loop", "_TrainingEpochLoop", functools.partial(patch, rt)),
            ("loops.evaluation_loop", "_EvaluationLoop", functools.partial(patch_evaluation, rt)),
            ("trainer.call", "_call_callback_hooks", patch_hooks),
            ("loops.fetchers", "_PrefetchDataFetcher", patch_fetcher),
            (
                "trainer.connectors.checkpoint_connector",
                "_CheckpointConnector",
                functools.partial(patch_resume, rt),
            ),
        ):
            imports.when_imported(f"{package}.{module}", ready, patcher, rt.say)
