"""`transformers.Trainer` under the addon: Trainer's own resume path, fed from the addon's tiers.

Trainer runs its own loop: its DataLoader prefetches a batch and ``get_batch_samples`` fetches a
whole accumulation window ahead, so "batches handed to the loop" (the generic data position) is
not where Trainer stands; ``trainer.state.global_step`` is. Trainer also knows how to resume
exactly from a checkpoint folder of its own format. So the addon does not steer Trainer from
outside; while ``Trainer.train()`` runs:

- **Boundary**: a `TrainerCallback`'s ``on_step_end`` (after the optimizer step, the scheduler
  step, ``zero_grad`` and ``global_step += 1``); the generic DataLoader tracking, fast-forward
  and optimizer-hook boundary are off. A step after which an evaluation is due is not a boundary
  (evaluation draws from the global RNG after ``on_step_end``); the next step's end is.
- **Captured**: ``trainer.model``, ``trainer.optimizer``, ``trainer.lr_scheduler``, the
  accelerator's grad scaler, ``trainer.state`` (as Trainer's JSON), and every rank's RNG.
- **Restore**: ``Trainer.train`` is wrapped. When the newest checkpoint was taken inside a
  Trainer and the script passed no ``resume_from_checkpoint``, the addon writes it out as a
  Trainer checkpoint folder (``pytorch_model.bin``, ``optimizer.pt``, ``scheduler.pt``,
  ``scaler.pt``, ``trainer_state.json``, ``rng_state[_<rank>].pth``) under the node-local tier
  and calls ``train(resume_from_checkpoint=<folder>)``. Trainer loads it, skips the finished
  epochs and the consumed batches of the current one by sampler index (accelerate's
  ``skip_first_batches``) and restores the RNG where its own resume does. The folder is deleted
  when ``train()`` returns.
- **Failed step** (failed_step.py): ``on_step_end`` is also the boundary kept for a failure; a
  failure raised out of ``train()`` saves that step before the exception leaves the wrapper.

Activated when ``LATTICE_AUTOPATCH`` names ``transformers`` (the default): a `sys.meta_path` hook
patches ``transformers.trainer`` right after it is imported.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from lattice.addon import imports

TRAINER_MODULE = "transformers.trainer"
STATE_KEY = "trainer.state"
FILES = {  # checkpoint key -> Trainer's file name (Trainer's constants, stable since 4.x)
    "trainer.model": "pytorch_model.bin",
    "trainer.optimizer": "optimizer.pt",
    "trainer.scheduler": "scheduler.pt",
    "trainer.scaler": "scaler.pt",
}


class _StateJson:
    """``trainer.state`` as a checkpointable object: Trainer's own JSON (`save_to_json`)."""

    def __init__(self, trainer_state: Any) -> None:
        self.trainer_state = trainer_state

    def state_dict(self) -> dict[str, Any]:
        text = json.dumps(dataclasses.asdict(self.trainer_state), indent=2, sort_keys=True)
        return {"json": text + "\n"}

    def load_state_dict(self, raw: dict[str, Any]) -> None:  # restored by Trainer itself
        pass


def objects(trainer: Any) -> dict[str, Any]:
    """What is checkpointed while ``trainer.train()`` runs."""
    found: dict[str, Any] = {"trainer.model": trainer.model, STATE_KEY: _StateJson(trainer.state)}
    if trainer.optimizer is not None:
        found["trainer.optimizer"] = trainer.optimizer
    if trainer.lr_scheduler is not None:
        found["trainer.scheduler"] = trainer.lr_scheduler
    scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
    if scaler is not None:
        found["trainer.scaler"] = scaler
    return found


def _trainer_rng(rng: dict[str, Any], distributed: bool) -> dict[str, Any]:
    """The addon's RNG capture (see `state.capture_rng`) in Trainer's ``rng_state.pth`` layout."""
    version, internal, gauss = rng["python"]
    out: dict[str, Any] = {"python": (version, tuple(internal), gauss), "cpu": rng["torch"]}
    if "numpy" in rng:
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        out["numpy"] = (kind, keys.numpy().astype("uint32"), pos, has_gauss, cached)
    if "cuda" in rng:
        cuda = rng["cuda"]
        out["cuda"] = cuda if distributed else cuda[torch.cuda.current_device()]
    return out


def write_resume_folder(trainer: Any, got: dict[str, Any], folder: Path) -> Path:
    """Write checkpoint ``got`` (replicated state + this rank's RNG) as a Trainer checkpoint."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    replicated = got["state"]
    for key, name in FILES.items():
        if key in replicated:
            torch.save(replicated[key], folder / name)
    (folder / "trainer_state.json").write_text(replicated[STATE_KEY]["json"])
    if got["rng"] is not None:
        args = trainer.args
        distributed = args.world_size > 1
        name = f"rng_state_{args.process_index}.pth" if distributed else "rng_state.pth"
        torch.save(_trainer_rng(got["rng"], distributed), folder / name)
    return folder


def choose(rt: Any, trainer: Any, given: Any) -> bool:
    """Whether the addon's checkpoint is restored rather than ``resume_from_checkpoint``'s.

    The script's own resume (``get_last_checkpoint(output_dir)``, or ``True``) finds the last
    folder Trainer saved every ``save_steps``: older than the addon's. Of the two, the newer
    (by global step) is restored; the script's where the addon has none, or one taken outside
    Trainer; the addon's where the script's names none (``True`` with nothing saved)."""
    if rt.restore_done:  # restored (or not) at an earlier train() of this process
        return False
    path = _folder(trainer, given)
    theirs = _global_step(path)
    ours = rt.pending_checkpoint()  # collective: every rank is here
    mine = _global_step_of(ours)
    if rt.restores_own(ours, mine, theirs):
        rt.say(
            f"Trainer.train(resume_from_checkpoint={str(given)!r}) not loaded: "
            + (f"its folder is at global step {theirs}, " if theirs is not None else "")
            + f"the addon's checkpoint at {mine} (restored instead)"
        )
        return True
    if theirs is not None:
        mine_is = "none" if ours is None else "taken outside Trainer" if mine is None else mine
        rt.forgo_restore(
            f"Trainer.train(resume_from_checkpoint={str(given)!r}): Trainer resumes from its "
            f"folder at global step {theirs} (the addon's checkpoint: {mine_is})",
            theirs,
        )
    return False


def _folder(trainer: Any, given: Any) -> Path | None:
    """The folder ``resume_from_checkpoint`` names (``True``: the last in ``output_dir``)."""
    if given is not True:
        return Path(given)
    from transformers.trainer_utils import get_last_checkpoint

    out = trainer.args.output_dir
    last = get_last_checkpoint(out) if out and Path(out).is_dir() else None
    return Path(last) if last else None


def _global_step(folder: Path | None) -> int | None:
    """A Trainer checkpoint folder's global step (None: no folder, or not a readable one)."""
    if folder is None:
        return None
    try:
        return int(json.loads((folder / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _global_step_of(replicated: dict[str, Any] | None) -> int | None:
    """A checkpoint's Trainer global step (None: none, or not taken inside Trainer)."""
    if replicated is None or STATE_KEY not in replicated:
        return None
    return int(json.loads(replicated[STATE_KEY]["json"])["global_step"])


def patch(rt: Any, module: Any) -> None:
    """Wrap ``module.Trainer.train`` (idempotent)."""
    trainer_cls = module.Trainer
    original = trainer_cls.train
    if getattr(original, "_lattice", False):
        return
    from transformers.trainer_callback import TrainerCallback

    class LatticeCallback(TrainerCallback):  # type: ignore[misc]
        """The step boundary inside Trainer's loop."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            rt.trainer_step_end(state.global_step, bool(control.should_evaluate))

    @functools.wraps(original)
    def train(self: Any, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        folder = None
        given = resume_from_checkpoint is not None and resume_from_checkpoint is not False
        if not given or choose(rt, self, resume_from_checkpoint):
            folder = rt.trainer_resume(self)
            if folder is not None or given:
                resume_from_checkpoint = None if folder is None else str(folder)
        callback = LatticeCallback()
        self.add_callback(callback)
        rt.trainer_begin(self)
        try:
            return original(self, resume_from_checkpoint, *args, **kwargs)
        except Exception:
            rt.save_after_failure()
            raise
        finally:
            rt.trainer_end()
            self.remove_callback(callback)
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    train._lattice = True  # type: ignore[attr-defined]
    trainer_cls.train = train


def install(rt: Any) -> None:
    """Patch Trainer now if ``transformers.trainer`` is imported, else when it is."""
    imports.when_imported(TRAINER_MODULE, "Trainer", functools.partial(patch, rt), rt.say)
