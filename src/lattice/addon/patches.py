"""What the addon changes in torch: object tracking, step hooks, the scheduler during a
fast-forward, DataLoader iteration, and DDP's teardown at exit."""

from __future__ import annotations

import functools
import sys
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from lattice.addon import collective, data, shadows

if TYPE_CHECKING:
    from lattice.addon.runtime import Runtime


def track_init(
    cls: type, refs: list[weakref.ref[Any]], made: Callable[[], None] | None = None
) -> None:
    """Keep a weak reference in ``refs`` to each object ``cls.__init__`` makes, and call
    ``made`` then (what is derived from ``refs`` is stale)."""
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if not any(ref() is self for ref in refs):
            refs[:] = [ref for ref in refs if ref() is not None]  # (a loader per evaluation)
            refs.append(weakref.ref(self))
            if made is not None:
                made()

    cls.__init__ = __init__  # type: ignore[method-assign]


def wrap_iter(cls: type, iterate: Callable[[Any, Callable[[Any], Any]], Any]) -> None:
    """Route ``cls.__iter__`` through ``iterate(self, original)`` (`Runtime.loader_iter`, or an
    adapter's step before it), once: its signature kept, marked so a second patch is a no-op."""
    original = cls.__iter__
    if getattr(original, "_lattice", False):
        return

    @functools.wraps(original)
    def __iter__(self: Any) -> Any:
        return iterate(self, original)

    __iter__._lattice = True  # type: ignore[attr-defined]
    cls.__iter__ = __iter__  # type: ignore[method-assign]


def patch_torch(rt: Runtime) -> None:
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    track_init(torch.optim.Optimizer, rt.optimizers, rt.optimizer_made)
    patch_schedulers(rt)
    track_init(torch.amp.GradScaler, rt.scalers)
    track_init(torch.optim.swa_utils.AveragedModel, rt.averaged)
    shadows.patch_copies(rt.module_copied)

    def pre_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
        if rt.wrapped(opt):
            return  # stepped inside its wrapper's step, whose hooks count
        rt.stepping = True
        if (rt.replay_due or not (rt.restore_done or rt.replay_tried)) and not rt.loading:
            rt.restore_at_first_step(opt)
        return _outside_step(rt, args, kwargs)

    def post_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if rt.wrapped(opt):
            return
        rt.stepping = False
        rt.note_step(opt)
        if rt.replaying:
            rt.replaying = False  # the restored step's replay: not a step of this run
            return
        rt.optimizer_steps += 1
        rt.on_optimizer_step(opt)

    register_optimizer_step_pre_hook(pre_step)
    register_optimizer_step_post_hook(post_step)

    wrap_iter(DataLoader, rt.loader_iter)

    loader_init = DataLoader.__init__

    @functools.wraps(loader_init)  # its signature: libraries read it to make a loader again
    def __init__(self: DataLoader, *args: Any, **kwargs: Any) -> None:
        loader_init(self, *args, **kwargs)
        if data.SITE not in self.__dict__:  # a subclass's __init__ calls this one's
            self.__dict__[data.SITE] = data.site(sys._getframe(1), rt.loader_sites)

    DataLoader.__init__ = __init__  # type: ignore[method-assign]
    data.patch_samplers()
    patch_ddp_teardown()


def _outside_step(rt: Runtime, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
    """A step's closure (Lightning's automatic optimization runs the forward and backward
    inside ``optimizer.step(closure)``) runs before the update: a failure there (a peer died
    in the gradient all-reduce) leaves the parameters whole, so the step is not marked as cut
    in half while it runs (`Runtime.save_failed_step`)."""
    closure = kwargs.get("closure", args[0] if args else None)
    if not callable(closure):
        return None

    def outside() -> Any:
        rt.stepping = False
        result = closure()
        rt.stepping = True  # (not on a raise: the update never began)
        return result

    if "closure" in kwargs:
        return args, {**kwargs, "closure": outside}
    return (outside, *args[1:]), kwargs


def patch_schedulers(rt: Runtime) -> None:
    """Every LR scheduler is tracked, and its ``step`` does nothing in a fast-forwarded epoch.

    Patching ``LRScheduler`` alone misses some: ``SequentialLR``, ``ChainedScheduler`` and
    ``ReduceLROnPlateau`` never call ``LRScheduler.__init__`` (they were not saved at all),
    and they and ``CosineAnnealingWarmRestarts`` define their own ``step``. So the
    ``__init__`` and ``step`` that each subclass defines are patched too, those of subclasses
    defined later (a script's own scheduler) as they are defined.
    """
    base = torch.optim.lr_scheduler.LRScheduler

    def guarded(step: Any) -> Any:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            if rt.suppress_scheduler:
                return None  # a fast-forwarded epoch: the restored scheduler already holds it
            return step(self, *args, **kwargs)

        wrapper.__doc__, wrapper.__name__ = step.__doc__, step.__name__
        return wrapper

    def patch(cls: type) -> None:
        if "__init__" in cls.__dict__:
            track_init(cls, rt.schedulers)
        if "step" in cls.__dict__:
            cls.step = guarded(cls.__dict__["step"])  # type: ignore[attr-defined]

    pending, seen = [base], set()
    while pending:
        cls = pending.pop()
        if cls not in seen:
            seen.add(cls)
            patch(cls)
            pending.extend(cls.__subclasses__())

    own = base.__dict__.get("__init_subclass__")  # a later torch may define one

    def __init_subclass__(cls: type, **kwargs: Any) -> None:
        if own is not None:
            own.__func__(cls, **kwargs)
        else:
            super(base, cls).__init_subclass__(**kwargs)
        patch(cls)

    base.__init_subclass__ = classmethod(__init_subclass__)  # type: ignore[assignment]


DDP_TEARDOWN_YIELD_S = 0.2
EXIT_YIELD_S = 0.3
_GROUPS_USED = False  # a process group existed in this process (destroyed or not)


def yield_to_collectives() -> None:
    """Let gloo's worker threads let go of finished collectives before the interpreter ends.

    A gloo worker thread drops a finished collective's tensors after the caller has returned
    from waiting on it, and needs the GIL to do so; if the interpreter is finalizing by then,
    the thread is ended inside C++ and the process aborts ("terminate called without an
    active exception", exit -6). Seen at the end of FSDP2 scripts on a loaded machine, plain
    ones included (about 1 run in 50). Sleeping here, the last thing before finalization,
    leaves the GIL to those threads.
    """
    if _GROUPS_USED or collective.dist() is not None:
        time.sleep(EXIT_YIELD_S)


def patch_ddp_teardown() -> None:
    """Keep DDP's teardown from hanging the process at exit (pytorch#56297).

    DDP's Reducer holds the process group. When DDP is freed after ``destroy_process_group()``
    (typically as the script's ``main()`` returns), the Reducer drops the group's last
    reference with the GIL held, and gloo's destructor joins its worker threads; one that still
    has a finished work to drop needs the GIL, and the process hangs for ever (seen at the end
    of jobs on a loaded machine). The fix: ``destroy_process_group()`` first releases the
    Reducers of the DDP models on that group, while the group is still registered, so the
    group's last reference is dropped by torch's own teardown, which releases the GIL. A
    script that never calls it gets the fallback: yielding the GIL for a moment before a
    Reducer goes lets the threads drop what they hold.
    """
    import torch.distributed as dist
    from torch.distributed import distributed_c10d
    from torch.nn.parallel import DistributedDataParallel

    if "__del__" in DistributedDataParallel.__dict__:
        return
    models: list[weakref.ref[Any]] = []
    track_init(DistributedDataParallel, models)

    def __del__(self: Any) -> None:
        if "reducer" in self.__dict__:
            time.sleep(DDP_TEARDOWN_YIELD_S)

    DistributedDataParallel.__del__ = __del__  # type: ignore[attr-defined]

    original = distributed_c10d.destroy_process_group

    def destroy_process_group(group: Any = None) -> None:
        global _GROUPS_USED
        _GROUPS_USED = True
        world = distributed_c10d.GroupMember.WORLD
        for ref in models:
            model = ref()
            if model is None or "reducer" not in model.__dict__:
                continue
            if group is None or group is world or getattr(model, "process_group", None) is group:
                model.__dict__.pop("logger", None)  # holds the Reducer too
                del model.__dict__["reducer"]
        original(group)

    destroy_process_group.__doc__ = original.__doc__
    distributed_c10d.destroy_process_group = destroy_process_group
    dist.destroy_process_group = destroy_process_group
