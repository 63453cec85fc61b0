"""Which training objects exist, and the names that find them again after a restart.

Objects are recorded when they are built (the constructors are wrapped: torch has no hook for
that) with a creation ordinal. A checkpoint names each object by kind, class and a signature
of its state's shapes, plus its rank among live objects with that same name in creation order:
a fresh run of the same script builds the same objects in the same order, so the names match.
"""

from __future__ import annotations

import hashlib
import itertools
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Entry:
    key: str
    obj: Any  # what state_dict()/load_state_dict() are called on
    replicated: bool  # identical on every rank (saved once), else saved per rank


class Registry:
    def __init__(self) -> None:
        self._ordinal = itertools.count()
        self.modules: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
        self.optimizers: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self.schedulers: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self.scalers: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self.registered: dict[str, Any] = {}
        self.module_version = 0
        self._roots: list[nn.Module] | None = None

    def add(self, table: weakref.WeakKeyDictionary[Any, int], obj: Any) -> None:
        if obj not in table:
            table[obj] = next(self._ordinal)
            if table is self.modules:
                self._roots = None

    def register(self, obj: Any, name: str | None) -> str:
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(
                f"lattice.register needs an object with state_dict() and load_state_dict(), "
                f"not a {type(obj).__qualname__}"
            )
        if name is None:
            same = sum(1 for k in self.registered if k.startswith(type(obj).__qualname__ + "."))
            name = f"{type(obj).__qualname__}.{same}"
        self.registered[name] = obj
        return name

    # -- live objects ---------------------------------------------------------------------
    def roots(self) -> list[nn.Module]:
        """Live modules that are nobody's child, in creation order, wrappers unwrapped."""
        if self._roots is None:
            live = sorted(self.modules.items(), key=lambda kv: kv[1])
            children = {id(c) for m, _ in live for c in m.children()}
            roots: list[nn.Module] = []
            seen: set[int] = set()
            for m, _ in live:
                if id(m) in children:
                    continue
                inner = unwrap(m)
                if id(inner) not in seen:
                    seen.add(id(inner))
                    roots.append(inner)
            self._roots = roots
        return [m for m in self._roots]

    def wrapped_by_ddp(self) -> set[int]:
        """ids of modules that a live DistributedDataParallel wraps (their state is replicated)."""
        ddp = _ddp_class()
        if ddp is None:
            return set()
        return {id(m.module) for m in self.modules if isinstance(m, ddp)}

    def entries(self, world_size: int) -> list[Entry]:
        """Everything to checkpoint, named; modules only if they hold state."""
        taken = {id(o) for o in self.registered.values()}
        replicated_ids = self.wrapped_by_ddp() if world_size > 1 else None
        out: list[Entry] = []

        def rep(module_ids: Iterable[int]) -> bool:
            ids = list(module_ids)
            return replicated_ids is None or (bool(ids) and all(i in replicated_ids for i in ids))

        param_owner: dict[int, int] = {}
        modules = [m for m in self.roots() if id(m) not in taken]
        for key, m in _numbered((module_key(m), m) for m in modules):
            if not _has_state(m):
                continue
            out.append(Entry(key, m, rep([id(m)])))
            for p in m.parameters():
                param_owner[id(p)] = id(m)
        opt_keys: dict[int, str] = {}
        opt_rep: dict[int, bool] = {}
        optimizers = [o for o, _ in sorted(self.optimizers.items(), key=lambda kv: kv[1])]
        for key, o in _numbered((optimizer_key(o), o) for o in optimizers if id(o) not in taken):
            owners = {param_owner.get(id(p), -1) for g in o.param_groups for p in g["params"]}
            opt_rep[id(o)] = rep(owners)
            opt_keys[id(o)] = key
            out.append(Entry(key, o, opt_rep[id(o)]))
        schedulers = [s for s, _ in sorted(self.schedulers.items(), key=lambda kv: kv[1])]
        for key, s in _numbered(
            (scheduler_key(s, opt_keys), s) for s in schedulers if id(s) not in taken
        ):
            opt = getattr(s, "optimizer", None)
            out.append(Entry(key, s, opt_rep.get(id(opt), replicated_ids is None)))
        all_rep = all(opt_rep.values()) if opt_rep else replicated_ids is None
        scalers = [s for s, _ in sorted(self.scalers.items(), key=lambda kv: kv[1])]
        for key, s in _numbered(
            (f"scaler/{type(s).__qualname__}", s) for s in scalers if id(s) not in taken
        ):
            out.append(Entry(key, s, all_rep))
        for name, obj in self.registered.items():
            out.append(Entry(f"user/{name}", obj, world_size == 1))
        return out


def unwrap(m: nn.Module) -> nn.Module:
    """The module whose state a wrapper (DDP, DataParallel, torch.compile) carries."""
    for _ in range(8):
        inner = None
        if type(m).__name__ in ("DistributedDataParallel", "DataParallel"):
            inner = getattr(m, "module", None)
        elif type(m).__name__ == "OptimizedModule":
            inner = getattr(m, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return m
        m = inner
    return m


def _ddp_class() -> type | None:
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # torch built without distributed
        return None
    return DistributedDataParallel


def _has_state(m: nn.Module) -> bool:
    return any(True for _ in m.parameters()) or any(True for _ in m.buffers())


def _digest(parts: Iterable[str]) -> str:
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def _shape(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{tuple(t.shape)}:{t.dtype}"
    return type(t).__name__


def module_key(m: nn.Module) -> str:
    sd = m.state_dict()
    return f"module/{type(m).__qualname__}/{_digest(f'{k}={_shape(v)}' for k, v in sd.items())}"


def optimizer_key(o: Any) -> str:
    groups = [",".join(_shape(p) for p in g["params"]) for g in o.param_groups]
    return f"optimizer/{type(o).__qualname__}/{_digest(groups)}"


def scheduler_key(s: Any, opt_keys: dict[int, str]) -> str:
    opt = opt_keys.get(id(getattr(s, "optimizer", None)), "-")
    return f"scheduler/{type(s).__qualname__}/{_digest([opt])}"


def _numbered(pairs: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """``key#n``: the n-th live object with that key, in creation order."""
    counts: dict[str, int] = {}
    for key, obj in pairs:
        n = counts.get(key, 0)
        counts[key] = n + 1
        yield f"{key}#{n}", obj
