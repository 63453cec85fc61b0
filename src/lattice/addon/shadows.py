"""Copies of a model that no optimizer steps: an EMA kept as a deep copy (timm's
``ModelEmaV2/V3``, YOLO's ``ModelEMA``, a script's own ``ema = copy.deepcopy(model)``), a
best-so-far copy. Without them a restarted run would go on with the copy the script made at
its start: an EMA of the initial weights, silently.

Found beside the models (`Runtime._find_models`, the same `gc` scan): a top-level module with
a model's parameter shapes, none of its parameters an optimizer's, not an ``AveragedModel``
(tracked on its own). Each is saved under a label taken from where it is held (a holder's
attribute ``ModelEMA.ema``, a variable ``ema``), not from its place in the heap, so a restarted
run loads each copy into the one it was taken from. The holder's numbers (YOLO's ``updates``,
which its decay depends on) are saved with it, and so are a holder module's own.

An EMA kept as bare tensors (diffusers' ``EMAModel``: ``shadow_params``) is tracked from its
``__init__`` (`install`) and saved through its own ``state_dict``, under a label found alike.
"""

from __future__ import annotations

import gc
import sys
import types
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lattice.addon.protocol import say

SCALARS = (int, float, bool)
PREFIX = "shadow."  # their names in a checkpoint
_LIBRARIES = ("lattice.", "torch.")  # frames whose variables are not the script's


@dataclass
class Shadow:
    obj: Any  # a module, or a tracked EMA object with its own state_dict (`TRACKED`)
    label: str  # where it is held: `Type.attr` of a holder object, or a variable's name
    holder: Any | None  # the (non-module) object holding it as an attribute, if any


class Scalars:
    """An object's numbers (int, float, bool attributes) as a state dict: an EMA holder's
    update counter. A module's private ones and its ``training`` flag are left out."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self.obj).items() if self._kept(k, v)}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        for name, value in saved.items():
            if self._kept(name, getattr(self.obj, name, None)) and type(value) in SCALARS:
                setattr(self.obj, name, value)

    def _kept(self, name: str, value: Any) -> bool:
        if isinstance(self.obj, nn.Module) and (name.startswith("_") or name == "training"):
            return False
        return type(value) in SCALARS


class Tensors:
    """A tracked EMA object's own state dict, loaded onto the devices and dtypes its tensors
    have now: a restore reads onto the CPU, and diffusers' ``load_state_dict`` keeps the
    tensors it is given (a CUDA model's EMA step would then mix devices)."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def state_dict(self) -> dict[str, Any]:
        return self.obj.state_dict()

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        live = self.obj.state_dict()
        self.obj.load_state_dict({k: _onto(v, live.get(k)) for k, v in saved.items()})


def _onto(saved: Any, live: Any) -> Any:
    if isinstance(saved, torch.Tensor) and isinstance(live, torch.Tensor):
        return saved.to(device=live.device, dtype=live.dtype)
    if isinstance(saved, list) and isinstance(live, list) and len(saved) == len(live):
        return [_onto(a, b) for a, b in zip(saved, live, strict=True)]
    return saved


def moved(shadow: Shadow) -> bool:
    """Whether its weights were ever written in place (an EMA's are, every step). A copy's
    are made anew (``deepcopy`` clones them: version 0); one never written is what the script
    made, and a restarted script makes it again, so a frozen reference model or teacher made
    by ``deepcopy`` costs no checkpoint space. (Not its buffers: copying one bumps it.)"""
    if isinstance(shadow.obj, nn.Module):
        return any(p._version for p in shadow.obj.parameters())
    return any(t._version for t in tensors([shadow]))


def tensors(shadows: list[Shadow]) -> list[torch.Tensor]:
    """What a step changes in place in them (their version counters prove a failed step's
    save that they did not move since the boundary)."""
    found: list[torch.Tensor] = []
    for shadow in shadows:
        if isinstance(shadow.obj, nn.Module):
            found += [*shadow.obj.parameters(), *shadow.obj.buffers()]
        else:
            for value in shadow.obj.state_dict().values():
                items = value if isinstance(value, list) else [value]
                found += [t for t in items if isinstance(t, torch.Tensor)]
    return found


# Classes of EMA objects kept as bare tensors, tracked from their __init__: module, class.
TRACKED = [("diffusers.training_utils", "EMAModel")]


def install(rt: Any) -> None:
    """Track each `TRACKED` class's instances in ``rt.emas`` once its module is imported."""
    from lattice.addon import imports, patches

    for module, name in TRACKED:

        def patch(mod: Any, name: str = name) -> None:
            patches.track_init(getattr(mod, name), rt.emas)

        imports.when_imported(module, name, patch, rt.say)


def find(
    modules: list[nn.Module],
    models: list[nn.Module],
    owned: set[int],
    exclude: Iterable[nn.Module],
    tracked: Iterable[Any] = (),
) -> list[Shadow]:
    """The shadow copies among ``modules`` (every module in the heap), then the ``tracked``
    EMA objects (`install`), each labelled, in a stable order.

    ``owned``: ids of the optimizers' parameters; ``exclude``: modules tracked otherwise
    (averaged models), whose inner copy is not a root either.
    """
    wanted = [s for s in (_signature(m) for m in models) if s]
    children = {
        id(c) for m in modules for c in (m.__dict__.get("_modules") or {}).values() if c is not None
    }
    skip = {id(m) for m in exclude} | {id(m) for m in models}
    found = []
    for module in modules:
        if id(module) in children or id(module) in skip or _wrapper(module):
            continue
        signature = _signature(module)
        if (
            signature
            and signature in wanted
            and not any(id(p) in owned for p in module.parameters())
        ):
            found.append(module)
    labelled = [(_where(m), m) for m in [*found, *tracked]]
    counts: dict[str, int] = {}
    for (label, _), _m in labelled:
        counts[label] = counts.get(label, 0) + 1
    shadows, seen = [], dict.fromkeys(counts, 0)
    for (label, holder), module in labelled:
        if counts[label] > 1:  # held alike (a list of copies): by heap order
            seen[label] += 1
            label = f"{label}#{seen[label] - 1}"
        shadows.append(Shadow(module, label, holder))
    return shadows


def state_objects(shadows: list[Shadow]) -> dict[str, Any]:
    """What a checkpoint saves of them, by name (`Runtime.objects`)."""
    found: dict[str, Any] = {}
    for shadow in shadows:
        module = isinstance(shadow.obj, nn.Module)
        found[f"{PREFIX}{shadow.label}"] = shadow.obj if module else Tensors(shadow.obj)
        for owner, part in ((shadow.holder, "holder"), (shadow.obj if module else None, "own")):
            if owner is not None and Scalars(owner).state_dict():
                found[f"{PREFIX}{shadow.label}.{part}"] = Scalars(owner)
    return found


def load(name: str, obj: Any, saved: dict[str, Any]) -> None:
    """Load one of `state_objects` from a checkpoint; one it lacks or that does not fit (the
    script changed) is left as the script made it, and said so."""
    if name not in saved:
        say(f"{name[len(PREFIX) :]} is not in the checkpoint: left as the script made it")
        return
    try:
        obj.load_state_dict(saved[name])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        say(f"{name[len(PREFIX) :]} not restored, it does not fit the checkpoint's: {exc}")


def patch_copies(seen: Callable[[], None]) -> None:
    """Call ``seen`` whenever a module is deep-copied or unpickled (``__setstate__``): a copy
    made once training runs (an EMA started after a warm-up, a best-so-far copy) is then
    looked for again."""
    original = nn.Module.__setstate__

    def __setstate__(self: nn.Module, state: dict[str, Any]) -> None:
        original(self, state)
        seen()

    nn.Module.__setstate__ = __setstate__  # type: ignore[method-assign]


def _signature(module: nn.Module) -> tuple[tuple[int, ...], ...]:
    """The parameters' shapes in order (not dtypes or devices: an EMA may be kept in float32
    or on the CPU); empty for a module with none or with uninitialized (lazy) ones."""
    try:
        return tuple(tuple(p.shape) for p in module.parameters())
    except Exception:  # any module in the heap: a half-built one (its __init__ raised), lazy
        return ()


def _wrapper(module: nn.Module) -> bool:
    from lattice.addon.runtime import WRAPPERS

    return type(module).__name__ in WRAPPERS


def _where(module: Any) -> tuple[str, Any | None]:
    """(label, holder): a holder object's attribute, else a variable of the script (a global,
    or a local of the outermost frame on the stack that has it), else the module's type."""
    for ref in gc.get_referrers(module):
        owner = _dict_owner(ref) if type(ref) is dict else ref
        if owner is None or isinstance(owner, nn.Module | types.ModuleType | types.FrameType):
            continue
        attrs = _attrs(owner)
        name = next((k for k, v in attrs.items() if v is module), None)
        if name is not None:
            return f"{type(owner).__qualname__}.{name}", owner
    # Outermost first: the script's main function or module holds it wherever the scan runs
    # from (a helper it is passed to may name it otherwise, and is not always on the stack).
    frames, frame = [], sys._getframe(1)
    while frame is not None:
        if not str(frame.f_globals.get("__name__", "")).startswith(_LIBRARIES):
            frames.append(frame)
        frame = frame.f_back
    for frame in reversed(frames):
        for scope in (frame.f_globals, frame.f_locals):
            name = next((k for k, v in scope.items() if v is module), None)
            if name is not None:
                return name, None
    return type(module).__qualname__, None


def _attrs(obj: Any) -> dict[str, Any]:
    """``vars(obj)``, or nothing: it reads ``__dict__``, which a proxy may answer oddly."""
    try:
        attrs = vars(obj)
    except Exception:  # any object in the heap: its __getattr__ may raise anything
        return {}
    return attrs if isinstance(attrs, dict) else {}


def _dict_owner(attrs: dict[str, Any]) -> Any | None:
    """The object whose ``__dict__`` is ``attrs`` (None for a plain dict)."""
    return next(
        (ref for ref in gc.get_referrers(attrs) if type(ref) is not dict and _attrs(ref) is attrs),
        None,
    )


Ref = tuple[weakref.ref[Any], str, Callable[[], Any]]


def refs(shadows: list[Shadow]) -> list[Ref]:
    """Weak references to cache them by (a holder that takes none is held)."""
    found = []
    for shadow in shadows:
        holder = shadow.holder
        try:
            held: Callable[[], Any] = weakref.ref(holder) if holder is not None else _none
        except TypeError:  # no __weakref__ slot
            held = lambda holder=holder: holder  # noqa: E731
        found.append((weakref.ref(shadow.obj), shadow.label, held))
    return found


def alive(cached: list[Ref]) -> list[Shadow] | None:
    """Cached shadows back from weak references (None once one is gone)."""
    shadows = []
    for ref, label, holder in cached:
        module = ref()
        if module is None:
            return None
        shadows.append(Shadow(module, label, holder()))
    return shadows


def _none() -> None:
    return None
