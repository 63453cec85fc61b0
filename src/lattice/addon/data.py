"""Data position: which batches each DataLoader pass has handed to the training loop.

With the sampler's strided split, the samples consumed in a pass are a prefix of the pass's
global order. A restored pass skips that prefix by sampler index (no data is loaded for it) and
re-splits the remainder over the current world size, padded like `DistributedSampler` pads.

A loader whose indices come from a sampler or batch sampler of its own (bucketing by length, a
custom distributed sampler) is resumed by count instead: each rank's index stream skips the
batches that rank had taken (indices only, no data read). That is exact when the pass's order is
the same as the first time (a sampler seeded by its epoch) and the world size has not changed.

An IterableDataset has no index: one that keeps its own state (`stream`) is resumed from each
rank's saved state at the same world size; any other starts its pass over.
"""

from __future__ import annotations

import copy
import itertools
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)
from torch.utils.data.distributed import DistributedSampler

from lattice.addon import collective, loops


@dataclass
class Position:
    """Where one loader stood at a checkpoint: pass index and global samples consumed in it."""

    pass_index: int
    consumed: int
    done: bool
    order: list[int] | None = None  # the pass's order when it came from a random draw
    # Passes during which optimizer steps were made, as [first, last] ranges; None (a
    # checkpoint from before this was recorded): every pass counts as one with steps.
    stepped: list[list[int]] | None = None
    # Resumed by count (`index_source` is None): the batches each rank had taken, and the
    # world size then; ``consumed`` is 0.
    batches: int | None = None
    world: int = 1
    counter: int | None = None  # an adapter's own pass counter then (`LoaderTrack.counter`)
    # The state of the RandomSampler's own generator (``DataLoader(generator=g)``, accelerate's
    # synchronized one) after the pass drew its order: the next pass draws from it.
    generator: torch.Tensor | None = None
    # This rank's `stream` state at the checkpoint (each rank's is saved apart: not in
    # `to_state`, which is the same on every rank).
    stream: Any = None
    site: str | None = None  # where the loader was made (`site`): which loader this is
    # A pass of accelerate's BatchSamplerShard: the batches of the one global order taken so
    # far by all ranks (`shard_of`); a resize re-splits the rest (`_resplit_shard`).
    shard: int | None = None
    # Not saved: stands for a loader made before the checkpoint's at the same place (a new
    # DataLoader every epoch), whose passes are all before it (`matching`).
    earlier: bool = False

    def had_steps(self, pass_index: int) -> bool:
        """Whether the restored state holds steps made during pass ``pass_index``."""
        if self.stepped is None:
            return True
        return any(first <= pass_index <= last for first, last in self.stepped)

    def to_state(self) -> dict[str, Any]:
        return {
            "pass": self.pass_index,
            "consumed": self.consumed,
            "done": self.done,
            "order": torch.tensor(self.order, dtype=torch.int64) if self.order else None,
            "stepped": [list(r) for r in self.stepped] if self.stepped is not None else None,
            "batches": self.batches,
            "world": self.world,
            "counter": self.counter,
            "generator": self.generator,
            "site": self.site,
            "shard": self.shard,
        }

    @classmethod
    def from_state(cls, raw: dict[str, Any]) -> Position:
        order = raw.get("order")
        stepped = raw.get("stepped")
        return cls(
            int(raw["pass"]),
            int(raw["consumed"]),
            bool(raw["done"]),
            order.tolist() if order is not None else None,
            [[int(a), int(b)] for a, b in stepped] if stepped is not None else None,
            int(raw["batches"]) if raw.get("batches") is not None else None,
            int(raw.get("world", 1)),
            int(raw["counter"]) if raw.get("counter") is not None else None,
            raw.get("generator"),
            site=raw.get("site"),
            shard=int(raw["shard"]) if raw.get("shard") is not None else None,
        )


@dataclass
class LoaderTrack:
    """What the addon knows about one DataLoader."""

    index: int
    passes: int = 0  # __iter__ calls so far
    yielded: int = 0  # batches handed to the loop in the current pass
    # Already consumed when the current pass (re)started: global samples, or this rank's
    # batches for a loader resumed by count.
    base: int = 0
    shard_base: int = 0  # the same for a BatchSamplerShard pass, in `Position.shard`'s unit
    done: bool = False
    resume: Position | None = None  # set on restore; consumed by the matching pass
    stepped: list[list[int]] = field(default_factory=list)  # see Position.stepped
    # An adapter around a DataLoader (accel.py) that counts its passes in this attribute.
    counter: str | None = None
    site: str | None = None  # see `site`
    # A consumer that reads the pass ahead of the loop (Lightning's fetcher, for a loader
    # without a length: `READ_AHEAD`) keeps `ahead` up to date: batches handed out that no
    # finished step took yet. The position is then ``ahead`` batches back, and so is the
    # stream state, taken from `streams`: (batches handed out, the stream's state then).
    ahead: int = 0
    streams: list[tuple[int, Any]] | None = None

    def take_resume(self, position: Position) -> None:
        self.resume = position
        if position.stepped is not None:
            self.stepped = [list(r) for r in position.stepped]

    def mark_step(self) -> None:
        """An optimizer step was made while this loader's current pass was open."""
        current = max(self.passes - 1, 0)
        if self.stepped and self.stepped[-1][1] >= current - 1:
            self.stepped[-1][1] = max(self.stepped[-1][1], current)
        else:
            self.stepped.append([current, current])

    def record_stream(self, loader: DataLoader) -> None:
        """After each batch handed out, when the loop reads ahead: the stream's state then."""
        if self.streams is not None:
            self.streams = [*self.streams[-3:], (self.yielded, stream_state(loader))]

    def stream_state(self, loader: DataLoader) -> Any:
        """`stream_state` where the loop stands: ``ahead`` batches back (None if not kept)."""
        if not self.ahead:
            return stream_state(loader)
        wanted = self.yielded - self.ahead
        return next((saved for n, saved in self.streams or () if n == wanted), None)

    def position(self, loader: DataLoader) -> Position:
        sampler, batch = index_source(loader)
        stepped = [list(r) for r in self.stepped]
        at = Position(max(self.passes - 1, 0), 0, self.done, None, stepped, site=self.site)
        if self.counter is not None:
            at.counter = getattr(loader, self.counter, None)
        drawn = random_sampler(loader)  # the pass's order came from a random draw
        if drawn is not None:
            at.order = getattr(drawn, "_lattice_order", None)
            if drawn.generator is not None:
                at.generator = drawn.generator.get_state()
        taken = self.yielded - self.ahead
        if sampler is None:
            at.batches, at.world = self.base + taken, collective.world()
            shard = shard_of(loader)
            if shard is not None:
                at.shard = self.shard_base + taken * (1 if shard.split_batches else at.world)
        else:
            world = sampler.num_replicas if isinstance(sampler, DistributedSampler) else 1
            at.consumed = self.base + taken * batch * world
        return at


# Samplers whose order a pass follows by index; the ones that draw it keep it (`DRAWN`).
DRAWN = (RandomSampler, WeightedRandomSampler, SubsetRandomSampler)
KNOWN = (DistributedSampler, SequentialSampler, *DRAWN)
SITE = "_lattice_site"  # set on each DataLoader as it is made (`site`)
READ_AHEAD = "_lattice_read_ahead"  # set on a DataLoader whose passes a consumer reads ahead


def site(start: FrameType | None, seen: dict[str, int]) -> str | None:
    """Where a DataLoader is made: the script's line (file name, function, line) and how
    many were made there before (``seen``, counted per process). The same on every rank, unlike
    the order loaders are first iterated in: a loader one rank iterates alone (an evaluation on
    the master process before training) shifted every later one's index on that rank, and
    positions were saved from one rank's order."""
    frames = loops.user_frames(start)
    if not frames:
        return None
    code = frames[0].f_code
    where = f"{Path(code.co_filename).name}:{code.co_qualname}:{frames[0].f_lineno}"
    seen[where] = seen.get(where, 0) + 1
    return f"{where}#{seen[where] - 1}"


def matching(track: LoaderTrack, positions: list[Position]) -> Position | None:
    """The saved position of ``track``'s loader: by `site` when the checkpoint has them,
    else by the order loaders were first iterated in (an older checkpoint)."""
    if track.site is not None and any(p.site is not None for p in positions):
        same = next((p for p in positions if p.site == track.site), None)
        return same if same is not None else _earlier_making(track.site, positions)
    return positions[track.index] if track.index < len(positions) else None


def _earlier_making(made: str, positions: list[Position]) -> Position | None:
    """For a loader made where the checkpoint's was, but before it (a script that makes a new
    DataLoader every epoch): its passes all came before the checkpoint, and when the later
    one's made optimizer steps, so did they: all of them are fast-forwarded. None for a
    loader whose later makings made no step (a validation loader made every epoch)."""
    where, _, count = made.rpartition("#")
    later = []
    for p in positions:
        other, _, n = (p.site or "").rpartition("#")
        if other == where and n.isdigit() and count.isdigit() and int(n) > int(count):
            later.append(p)
    if not any(p.stepped is None or p.stepped for p in later):
        return None
    return Position(0, 0, True, earlier=True, site=made)


INNER = "_lattice_inner"  # set on a DataLoader that an adapter iterates (accel.py)
DISPATCHED = "_lattice_dispatched"  # set on an adapter class whose pass cannot resume (accel.py)


def index_source(loader: DataLoader) -> tuple[Any, int]:
    """The sampler whose order a pass follows, if it is one resumed by sample index, and the
    samples per batch; (None, 0) for any other (a custom sampler or batch sampler, or a
    `stateful_loader`, whose own state is its position)."""
    if stateful_loader(loader) or getattr(type(loader), DISPATCHED, False):
        return None, 0
    batches = loader.batch_sampler
    if batches is None:  # no automatic batching: each index is an item
        sampler, per = loader.sampler, 1
    elif isinstance(batches, BatchSampler) and type(batches).__iter__ is BatchSampler.__iter__:
        sampler, per = batches.sampler, batches.batch_size
    else:
        return None, 0
    return (sampler, per) if _known(sampler) else (None, 0)


def _known(sampler: Any) -> bool:
    """One of `KNOWN`, iterated by that class's ``__iter__``: a subclass with its own (a
    distributed wrapper around a weighted sampler, say) ignores the index skip, so it is
    resumed by count like any sampler of the script's own."""
    base = next((k for k in KNOWN if isinstance(sampler, k)), None)
    return base is not None and type(sampler).__iter__ is base.__iter__


def _split(remaining: list[int], sampler: DistributedSampler) -> list[int]:
    """This rank's share of ``remaining`` under the strided split, padded like the sampler."""
    world, rank = sampler.num_replicas, sampler.rank
    if sampler.drop_last:
        remaining = remaining[: len(remaining) - len(remaining) % world]
    elif remaining and len(remaining) % world:
        pad = world - len(remaining) % world
        remaining = remaining + (remaining * (pad // len(remaining) + 1))[:pad]
    return remaining[rank::world]


def _distributed_order(sampler: DistributedSampler) -> list[int]:
    if sampler.shuffle:
        g = torch.Generator()
        g.manual_seed(sampler.seed + sampler.epoch)
        return torch.randperm(len(sampler.dataset), generator=g).tolist()  # type: ignore[arg-type]
    return list(range(len(sampler.dataset)))  # type: ignore[arg-type]


def _patch_sampler(cls: type, record_order: bool) -> None:
    original: Callable[[Any], Iterator[int]] = cls.__iter__
    if getattr(original, "_lattice", False):
        return

    def __iter__(self: Any) -> Iterator[int]:
        skip = self.__dict__.pop("_lattice_skip", None)
        if skip is None:
            self.__dict__.pop("_lattice_left", None)
            if record_order:
                order = list(original(self))
                self._lattice_order = order
                return iter(order)
            return original(self)
        consumed, order = skip
        if isinstance(self, DistributedSampler):
            rest = _split(_distributed_order(self)[consumed:], self)
        else:
            if order is None:  # a checkpoint that did not keep it (an older one): drawn again
                order = list(original(self)) if record_order else list(range(len(self.data_source)))
            if record_order:
                self._lattice_order = order
            rest = order[consumed:]
        return iter(rest)

    __iter__._lattice = True  # type: ignore[attr-defined]
    cls.__iter__ = __iter__  # type: ignore[method-assign]


def _left(sampler: Any, consumed: int) -> int:
    """The indices a pass of ``sampler`` resumed after ``consumed`` hands this rank (as
    `_split` cuts them, without drawing the order: the sampler runs at the first fetch)."""
    if isinstance(sampler, DistributedSampler):
        rest, world = max(len(sampler.dataset) - consumed, 0), sampler.num_replicas  # type: ignore[arg-type]
        return rest // world if sampler.drop_last else -(-rest // world)
    return max(len(sampler) - consumed, 0)


def resumed_batches(loader: DataLoader) -> int | None:
    """The batches ``loader``'s resumed pass hands this rank, or None when its pass was not
    resumed by index. A loop that counts its own batches (Lightning: the
    epoch ends when the count reaches the loader's length) must count the skipped part in the
    new world's terms: after a resize, the remaining samples are split anew."""
    sampler, batch = index_source(loader)
    left = getattr(sampler, "_lattice_left", None) if sampler is not None else None
    if left is None or not batch:
        return None
    # The batch sampler's: one the script gives keeps its own (the DataLoader's is then False).
    drop = getattr(loader.batch_sampler, "drop_last", False)
    return left // batch if drop else -(-left // batch)


def patch_samplers() -> None:
    """Let the samplers the addon understands start a pass part-way (by index, no data read)."""
    _patch_sampler(DistributedSampler, record_order=False)
    for cls in DRAWN:
        _patch_sampler(cls, record_order=True)
    _patch_sampler(SequentialSampler, record_order=False)


def arm_skip(loader: DataLoader, position: Position) -> tuple[int | None, str | None]:
    """Make the loader's next pass start where ``position`` stood, reading no data for what it
    skips: (what the pass starts from, in `LoaderTrack.base`'s unit, or None when it starts
    over; what the log should say, or None when the resume is exact)."""
    if getattr(type(loader), DISPATCHED, False):
        return None, (
            f"this {type(loader).__name__} (accelerate's dispatch_batches) reads ahead of the "
            "loop on one rank: its pass starts over (samples of it repeat)"
        )
    sampler, _ = index_source(loader)
    if sampler is not None and position.batches is None:
        sampler._lattice_skip = (position.consumed, position.order)
        sampler._lattice_left = _left(sampler, position.consumed)  # (`resumed_batches`)
        return position.consumed, None
    if stateful_loader(loader) or isinstance(loader.dataset, IterableDataset):
        return _resume_stream(loader, position)
    if sampler is not None or position.batches is None:
        return None, ("this DataLoader's sampler is not the one checkpointed: its pass starts over")
    indices = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    shard = shard_of(loader)
    if shard is not None and position.shard is not None:
        per_step = 1 if shard.split_batches else position.world
        if position.world != collective.world() or position.shard != position.batches * per_step:
            return _resplit_shard(loader, shard, position)
    _patch_count_skip(type(indices))
    indices._lattice_skip_batches = position.batches
    drawn = random_sampler(loader)
    if drawn is not None and position.order is not None:
        drawn._lattice_skip = (0, position.order)  # the pass's order again, not a new draw
    world = collective.world()
    if position.world == world:
        return position.batches, None
    return position.batches, (
        f"this DataLoader's sampler is resumed by count ({position.batches} batches per rank) "
        f"but the world size changed ({position.world} -> {world}): samples of this pass may "
        "repeat or be missed"
    )


def shard_of(loader: Any) -> Any | None:
    """accelerate's ``BatchSamplerShard`` behind ``loader``, if it has one: each rank takes
    every world-th batch of one global order of batches (or a world-th of each, with
    ``split_batches``)."""
    module = sys.modules.get("accelerate.data_loader")
    shard = getattr(loader, "batch_sampler", None)
    kind = getattr(module, "BatchSamplerShard", None) if module is not None else None
    return shard if kind is not None and isinstance(shard, kind) else None


def _resplit_shard(loader: Any, shard: Any, position: Position) -> tuple[int, None]:
    """A BatchSamplerShard pass resumed in another world (or after one): the global order's
    first ``position.shard`` batches are skipped before the shard splits the rest over this
    world, as `_split` does for a DistributedSampler; resumed by count, each rank skipped its
    own batches of the old world's split, and samples were missed or repeated."""
    inner = shard.batch_sampler
    _patch_count_skip(type(inner))
    inner._lattice_skip_batches = position.shard
    drawn = random_sampler(loader)
    if drawn is not None and position.order is not None:
        drawn._lattice_skip = (0, position.order)  # the pass's order again, not a new draw
    per_rank = position.shard if shard.split_batches else position.shard // collective.world()
    return per_rank, None


def _resume_stream(loader: DataLoader, position: Position) -> tuple[int | None, str | None]:
    """`arm_skip` for a loader whose position is its own or its stream's state (`stream`)."""
    holder = stream(loader)
    if position.batches == 0 and holder is not loader:
        # Nothing of the pass taken: it starts from its beginning. (A dataset's state, saved
        # before the pass's iterator ran, would still be the previous pass's end; a stateful
        # loader's is the new pass's, with the order it draws.)
        return 0, None
    if holder is not None and position.stream is not None and _same_world(position):
        holder.load_state_dict(position.stream)  # the pass's iterator resumes from it
        return position.batches, None
    if holder is loader:
        subject, why = f"this {type(loader).__name__}", _why_not(position)
    elif not issubclass(type(loader), DataLoader):
        subject = f"this {type(loader).__name__}'s IterableDataset"
        why = "is read ahead of the loop by it"
    elif holder is None and loader.num_workers:
        subject = "this DataLoader's IterableDataset"
        why = "keeps its state in the DataLoader's workers (num_workers > 0)"
    elif holder is None:
        subject = "this DataLoader's IterableDataset"
        why = "has no index to resume by (give it state_dict and load_state_dict)"
    else:
        subject, why = "this DataLoader's IterableDataset", _why_not(position)
    return None, f"{subject} {why}: its pass starts over (samples of it repeat)"


def end_pass(loader: DataLoader, position: Position) -> None:
    """The checkpoint's pass had ended: a stateful loader still takes its state (its next
    pass then draws the order the uninterrupted run's did)."""
    if stateful_loader(loader) and position.stream is not None and _same_world(position):
        loader.load_state_dict(position.stream)  # type: ignore[attr-defined]


def _same_world(position: Position) -> bool:
    return position.world == collective.world()


def _why_not(position: Position) -> str:
    if not _same_world(position):
        return f"was saved at world size {position.world}, not {collective.world()}"
    return "has no state in this checkpoint"


def stateful_loader(loader: DataLoader) -> bool:
    """A DataLoader that saves and loads its own position (torchdata's ``StatefulDataLoader``:
    its sampler's, its workers' datasets', with prefetching counted): that state is its
    position, per rank, like a `stream`'s."""
    kind = type(loader)  # not ``loader.__class__``: accelerate's adapters answer DataLoader
    # A DataLoader subclass: accelerate's adapters (which wrap one, and whose state_dict
    # serves only a StatefulDataLoader inside) have their own handling (accel.py).
    return issubclass(kind, DataLoader) and has_state(kind)


def has_state(obj: Any) -> bool:
    """Whether ``obj`` can say where it stands and be put back there: callable ``state_dict``
    and ``load_state_dict`` (torch's convention, torchdata's ``Stateful``)."""
    return all(callable(getattr(obj, name, None)) for name in ("state_dict", "load_state_dict"))


def stream(loader: DataLoader) -> Any | None:
    """What holds the loader's position as a state of its own: a `stateful_loader` itself,
    else its IterableDataset if that can say where it stands (``state_dict`` and
    ``load_state_dict``: Hugging Face ``datasets`` streaming, torchdata's ``Stateful``) and is
    iterated in this process (``num_workers=0``: a worker's copy would be the one moving)."""
    if stateful_loader(loader):
        return loader
    if not issubclass(type(loader), DataLoader):
        return None  # an adapter (accelerate's shard) reads a batch ahead of the loop
    dataset = loader.dataset
    if not isinstance(dataset, IterableDataset) or loader.num_workers:
        return None
    return dataset if has_state(dataset) else None


def stream_state(loader: DataLoader) -> Any:
    """A copy of `stream`'s state now (None without one): a stream may hand out a live dict."""
    dataset = stream(loader)
    return copy.deepcopy(dataset.state_dict()) if dataset is not None else None


def random_sampler(loader: DataLoader) -> Any | None:
    """The sampler that draws a pass's indices (`DRAWN`: a RandomSampler, weighted, a random
    subset), directly or through batch samplers (a script's own, accelerate's
    ``BatchSamplerShard``): its order is a new draw each pass, so the checkpoint keeps it, and
    the state of its generator."""
    node: Any = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    for _ in range(4):
        if isinstance(node, DRAWN):
            return node
        node = getattr(node, "batch_sampler", None) or getattr(node, "sampler", None)
    return None


def generator_state(loader: DataLoader, position: Position) -> Callable[[], None] | None:
    """Sets the resumed pass's sampler generator to its state at the checkpoint; to be called
    once the pass's iterator is made (making it draws the workers' seed from that generator)."""
    drawn = random_sampler(loader)
    generator = drawn.generator if drawn is not None else None
    if generator is None or position.generator is None:
        return None
    saved = position.generator
    return lambda: generator.set_state(saved)


def _patch_count_skip(cls: type) -> None:
    """A sampler or batch sampler of the script's own skips its first items once, if told to."""
    original: Callable[[Any], Iterator[Any]] = cls.__iter__
    if getattr(original, "_lattice_count", False):
        return

    def __iter__(self: Any) -> Iterator[Any]:
        skip = self.__dict__.pop("_lattice_skip_batches", 0)
        stream = original(self)
        return itertools.islice(stream, skip, None) if skip else stream

    __iter__._lattice_count = True  # type: ignore[attr-defined]
    cls.__iter__ = __iter__  # type: ignore[method-assign]
