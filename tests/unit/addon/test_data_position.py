"""Which sampler a DataLoader pass follows, and resuming a pass by count (`addon/data.py`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    TensorDataset,
)
from torch.utils.data.distributed import DistributedSampler

from lattice.addon import data

DATASET = TensorDataset(torch.arange(24))


class Buckets(Sampler[list[int]]):
    """A batch sampler of a script's own: fixed batches, in an order that depends on nothing
    but the sampler."""

    def __init__(self) -> None:
        self.batches = [[i, i + 12] for i in range(12)][::-1]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches

    def __len__(self) -> int:
        return len(self.batches)


class Evens(Sampler[int]):
    def __iter__(self) -> Iterator[int]:
        return iter(range(0, 24, 2))

    def __len__(self) -> int:
        return 12


def test_the_sampler_a_pass_follows_is_found_behind_a_batch_sampler() -> None:
    shuffled = DataLoader(DATASET, batch_size=4, shuffle=True)
    assert data.index_source(shuffled) == (shuffled.sampler, 4)
    split = DistributedSampler(DATASET, num_replicas=2, rank=1)
    # The DataLoader's own `sampler` is then a default one that is never iterated.
    wrapped = DataLoader(DATASET, batch_sampler=BatchSampler(split, 3, drop_last=False))
    assert data.index_source(wrapped) == (split, 3)
    unbatched = DataLoader(DATASET, batch_size=None)
    assert data.index_source(unbatched) == (unbatched.sampler, 1)
    assert isinstance(unbatched.sampler, SequentialSampler)
    assert data.index_source(DataLoader(DATASET, batch_sampler=Buckets())) == (None, 0)
    assert data.index_source(DataLoader(DATASET, batch_size=2, sampler=Evens())) == (None, 0)
    assert isinstance(RandomSampler(DATASET), data.KNOWN)


@pytest.mark.parametrize(
    "loader",
    [
        DataLoader(DATASET, batch_sampler=Buckets()),
        DataLoader(DATASET, batch_size=2, sampler=Evens()),
    ],
    ids=["batch_sampler", "sampler"],
)
def test_a_scripts_own_sampler_resumes_by_count(loader: DataLoader) -> None:
    whole = [b[0].tolist() for b in loader]
    track = data.LoaderTrack(index=0, passes=1, yielded=5)
    saved = data.Position.from_state(track.position(loader).to_state())
    assert (saved.batches, saved.world, saved.consumed) == (5, 1, 0)
    assert data.arm_skip(loader, saved) == (5, None)
    assert [b[0].tolist() for b in loader] == whole[5:]  # no batch of the 5 is loaded
    assert [b[0].tolist() for b in loader] == whole  # once: the next pass is whole
    # the next checkpoint in the resumed pass counts from where it started
    track.base, track.yielded = 5, 2
    assert track.position(loader).batches == 7


def test_resuming_by_count_at_another_world_size_says_so() -> None:
    loader = DataLoader(DATASET, batch_sampler=Buckets())
    start, note = data.arm_skip(loader, data.Position(0, 0, False, batches=3, world=2))
    assert start == 3
    assert note is not None and "world size changed (2 -> 1)" in note


def test_a_pass_that_cannot_be_skipped_starts_over() -> None:
    # checkpointed by sample index, the loader now has a sampler of the script's own
    loader = DataLoader(DATASET, batch_sampler=Buckets())
    start, note = data.arm_skip(loader, data.Position(0, 8, False))
    assert start is None and note is not None and "starts over" in note
    assert len(list(loader)) == 12


def test_a_position_saved_before_counts_existed_reads_as_by_index() -> None:
    old = {"pass": 1, "consumed": 8, "done": False, "order": None, "stepped": [[0, 1]]}
    got = data.Position.from_state(old)
    assert (got.consumed, got.batches, got.world) == (8, None, 1)


class Shard(Sampler[list[int]]):
    """Like accelerate's BatchSamplerShard: wraps a batch sampler, takes every other batch."""

    def __init__(self, batch_sampler: BatchSampler) -> None:
        self.batch_sampler = batch_sampler

    def __iter__(self) -> Iterator[list[int]]:
        for i, batch in enumerate(self.batch_sampler):
            if i % 2 == 0:
                yield batch

    def __len__(self) -> int:
        return (len(self.batch_sampler) + 1) // 2


def test_an_accelerate_shard_pass_is_split_anew_in_another_world(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """accelerate's BatchSamplerShard: 2 ranks took 2 batches each of one order of 8 batches;
    at 3 ranks the other 4 are split over them round robin, padded to a multiple of 3 from
    their first ones (as accelerate's even_batches pads any pass): none missed, none of the 4
    taken before taken again. Resumed by count, each rank skipped its first 2 batches of the
    new split: batches 6 and 7 of the order were never taken, 4 and 5 twice."""
    shard_cls = pytest.importorskip("accelerate.data_loader").BatchSamplerShard
    data.patch_samplers()
    items = list(range(16))
    order = torch.randperm(16, generator=torch.Generator().manual_seed(3)).tolist()
    b = [order[i : i + 2] for i in range(0, 16, 2)]  # the pass's order of batches

    def loader(world: int, rank: int) -> DataLoader:
        inner = BatchSampler(RandomSampler(items), 2, drop_last=False)
        return DataLoader(items, batch_sampler=shard_cls(inner, world, rank))

    monkeypatch.setattr(data.collective, "world", lambda: 2)
    saved = data.LoaderTrack(index=0, passes=1, yielded=2).position(loader(2, 0))
    assert (saved.shard, saved.batches, saved.world) == (4, 2, 2)
    saved.order = order  # (the pass's drawn order, as the RandomSampler kept it)
    monkeypatch.setattr(data.collective, "world", lambda: 3)
    split = []
    for rank in range(3):
        new = loader(3, rank)
        assert data.arm_skip(new, saved) == (1, None)
        split.append([batch.tolist() for batch in new])
    assert split == [[b[4], b[7]], [b[5], b[4]], [b[6], b[5]]]


def test_a_random_order_behind_batch_samplers_and_its_generator_are_resumed() -> None:
    """The pass's drawn order and the generator it came from are kept: the resumed pass
    follows the order, and the pass after it draws what it drew the first time."""
    data.patch_samplers()
    generator = torch.Generator().manual_seed(1)
    drawn = RandomSampler(DATASET, generator=generator)
    loader = DataLoader(DATASET, batch_sampler=Shard(BatchSampler(drawn, 2, drop_last=False)))
    assert data.random_sampler(loader) is drawn
    first = [b[0].tolist() for b in loader]
    track = data.LoaderTrack(index=0, passes=1, yielded=2)
    saved = data.Position.from_state(track.position(loader).to_state())
    assert saved.order is not None and saved.generator is not None
    second = [b[0].tolist() for b in loader]
    assert second != first
    generator.manual_seed(99)  # a restarted process: another state
    assert data.arm_skip(loader, saved) == (2, None)
    restore = data.generator_state(loader, saved)
    iterator = iter(loader)
    assert restore is not None
    restore()
    assert [b[0].tolist() for b in iterator] == first[2:]
    assert [b[0].tolist() for b in loader] == second


class Stream(IterableDataset):
    def __iter__(self) -> Iterator[int]:
        return iter(range(6))


def test_an_iterable_dataset_pass_starts_over_and_the_log_says_so() -> None:
    loader = DataLoader(Stream(), batch_size=2)
    track = data.LoaderTrack(index=0, passes=1, yielded=1)
    saved = data.Position.from_state(track.position(loader).to_state())
    start, note = data.arm_skip(loader, saved)
    assert start is None and note is not None and "IterableDataset" in note
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5]]


class StatefulStream(IterableDataset):
    """Says where it stands, as Hugging Face ``datasets`` streaming does."""

    def __init__(self) -> None:
        self.offset, self.resume = 0, 0

    def __iter__(self) -> Iterator[int]:
        start, self.resume = self.resume, 0
        for i in range(start, 6):
            self.offset = i + 1
            yield i

    def state_dict(self) -> dict[str, int]:
        return {"offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume = state["offset"]


def test_a_stream_with_state_resumes_from_this_ranks_saved_state() -> None:
    stream = StatefulStream()
    loader = DataLoader(stream, batch_size=2)
    it = iter(loader)
    next(it)
    live = data.stream_state(loader)
    assert live == {"offset": 2}
    stream.offset = 99  # a copy: the stream moving on does not change what was taken
    assert live == {"offset": 2}
    saved = data.Position(0, 0, False, batches=1, world=1, stream=live)
    assert data.arm_skip(loader, saved) == (1, None)
    assert [b.tolist() for b in loader] == [[2, 3], [4, 5]]


def test_a_pass_read_ahead_is_taken_where_the_loop_stands() -> None:
    """A consumer holding batches no finished step took (Lightning's fetcher, a batch ahead):
    the position and the stream's state are those of that many batches back."""
    loader = DataLoader(StatefulStream(), batch_size=2)
    track = data.LoaderTrack(index=0, streams=[(0, data.stream_state(loader))])
    it = iter(loader)
    for _ in range(2):  # the loop takes batch 1; the consumer already read batch 2
        next(it)
        track.yielded += 1
        track.record_stream(loader)
    track.ahead = 1
    assert track.position(loader).batches == 1
    assert track.stream_state(loader) == {"offset": 2}
    track.ahead = 0  # the consumer's buffer ran dry (the pass's end): where the loader stands
    assert track.position(loader).batches == 2 and track.stream_state(loader) == {"offset": 4}
    track.ahead = 3  # further back than kept: no state (the pass starts over), not a wrong one
    assert track.stream_state(loader) is None


def test_a_stream_pass_with_nothing_taken_starts_from_its_beginning() -> None:
    """Saved at the first fetch of a pass: the stream's state is still the previous pass's end
    (its iterator has not run), so it is not loaded."""
    loader = DataLoader(StatefulStream(), batch_size=2)
    saved = data.Position(1, 0, False, batches=0, world=1, stream={"offset": 6})
    assert data.arm_skip(loader, saved) == (0, None)
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize(
    ("workers", "world", "state", "why"),
    [
        (2, 1, {"offset": 2}, "keeps its state in the DataLoader's workers"),
        (0, 3, {"offset": 2}, "was saved at world size 3, not 1"),
        (0, 1, None, "has no state in this checkpoint"),
    ],
)
def test_a_stream_that_cannot_resume_starts_over_and_says_why(
    workers: int, world: int, state: dict[str, int] | None, why: str
) -> None:
    loader = DataLoader(StatefulStream(), batch_size=2, num_workers=workers)
    assert data.stream_state(loader) is None or workers == 0
    saved = data.Position(0, 0, False, batches=1, world=world, stream=state)
    start, note = data.arm_skip(loader, saved)
    assert start is None and note is not None and why in note and "starts over" in note


def test_a_stateful_loader_resumes_mid_pass_and_after_an_ended_one_from_its_own_state() -> None:
    """torchdata's StatefulDataLoader: its own state is its position, per rank. A checkpoint
    whose pass had ended still loads it: the next pass then draws the order it drew."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader() -> StatefulDataLoader:
        torch.manual_seed(5)  # its RandomSampler is seeded once, from the global RNG
        return StatefulDataLoader(DATASET, batch_size=4, shuffle=True)

    first = loader()
    assert data.stateful_loader(first) and data.index_source(first) == (None, 0)
    it = iter(first)
    taken = [next(it)[0].tolist() for _ in range(2)]
    mid = data.Position(0, 0, False, batches=2, world=1, stream=data.stream_state(first))
    rest = [b[0].tolist() for b in it]
    ended = data.Position(0, 0, True, batches=6, world=1, stream=data.stream_state(first))
    second_pass = [b[0].tolist() for b in first]

    resumed = loader()
    assert data.arm_skip(resumed, mid) == (2, None)
    assert [b[0].tolist() for b in resumed] == rest and len(taken + rest) == 6
    after_end = loader()
    data.end_pass(after_end, ended)
    assert [b[0].tolist() for b in after_end] == second_pass
    assert second_pass != taken + rest  # a new order: a fresh loader would draw the first again


class Reversed(DistributedSampler):
    """A DistributedSampler of the script's own with an ``__iter__`` of its own (deterministic):
    the index skip, read by DistributedSampler's ``__iter__``, would be ignored."""

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[::-1])


def test_a_known_samplers_subclass_with_its_own_iter_resumes_by_count() -> None:
    sampler = Reversed(DATASET, num_replicas=1, rank=0, shuffle=False)
    loader = DataLoader(DATASET, batch_size=4, sampler=sampler)
    assert data.index_source(loader) == (None, 0)
    track = data.LoaderTrack(index=0, passes=1, yielded=2)
    saved = data.Position.from_state(track.position(loader).to_state())
    assert saved.batches == 2 and saved.consumed == 0
    assert data.arm_skip(loader, saved) == (2, None)
    assert [b[0].tolist() for b in loader] == [
        [15, 14, 13, 12],
        [11, 10, 9, 8],
        [7, 6, 5, 4],
        [3, 2, 1, 0],
    ]


def test_loaders_are_matched_by_where_they_were_made() -> None:
    import sys

    seen: dict[str, int] = {}
    made = [data.site(sys._getframe(), seen) for _ in range(2)]  # one line, twice
    other = data.site(sys._getframe(), seen)
    assert made[0] is not None and made[0].endswith("#0") and made[1].endswith("#1")
    assert other is not None and other.rsplit("#", 1)[0] != made[0].rsplit("#", 1)[0]
    saved = [data.Position(0, 4, False, site=made[1]), data.Position(0, 8, False, site=made[0])]
    track = data.LoaderTrack(index=1, site=made[0])  # first iterated second on this rank
    assert data.matching(track, saved) is saved[1]
    assert data.matching(data.LoaderTrack(index=0, site=other), saved) is None
    older = [data.Position(0, 4, False), data.Position(0, 8, False)]  # no sites: by order
    assert data.matching(track, older) is older[1]


def test_a_loader_made_before_the_checkpoints_at_the_same_place_is_fast_forwarded() -> None:
    """A new DataLoader every epoch: the epochs before the checkpoint's have their own."""
    train = data.Position(0, 8, False, stepped=[[0, 0]], site="s.py:main:9#2")
    val = data.Position(0, 0, True, stepped=[], site="s.py:main:20#1")  # made no step
    saved = [train, val]
    earlier = data.matching(data.LoaderTrack(index=0, site="s.py:main:9#0"), saved)
    assert earlier is not None and earlier.earlier
    assert data.matching(data.LoaderTrack(index=1, site="s.py:main:20#0"), saved) is None
    assert data.matching(data.LoaderTrack(index=2, site="s.py:main:9#3"), saved) is None
    assert data.matching(data.LoaderTrack(index=3, site="s.py:main:9#2"), saved) is train


class Adapter:
    """accelerate's shard's shape: not a DataLoader, forwards reads to one, reads ahead."""

    def __init__(self, inner: DataLoader) -> None:
        self.base_dataloader = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self.base_dataloader, name)


def test_a_stream_read_ahead_by_an_adapter_is_not_resumed_from_its_state() -> None:
    """Its state is a batch past the loop's: loading it would skip a batch."""
    shard = Adapter(DataLoader(StatefulStream(), batch_size=2))
    assert data.stream(shard) is None  # type: ignore[arg-type]
    saved = data.Position(0, 0, False, batches=1, world=1, stream={"offset": 4})
    start, note = data.arm_skip(shard, saved)  # type: ignore[arg-type]
    assert start is None and note is not None and "read ahead" in note


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("consumed", [0, 7, 23, 24])
def test_the_batches_a_resumed_pass_hands_out_are_known_before_it_runs(
    drop_last: bool, consumed: int
) -> None:
    """A loop that counts an epoch's batches itself (Lightning) counts what the resume
    skipped in the new world's terms (`resumed_batches`): its sampler runs only at the first
    fetch, after the count is needed."""
    data.patch_samplers()
    for rank in range(3):  # a world of 3 resuming where a world of 2 stood
        split = DistributedSampler(DATASET, num_replicas=3, rank=rank, drop_last=drop_last)
        loader = DataLoader(DATASET, batch_size=2, sampler=split, drop_last=drop_last)
        assert data.arm_skip(loader, data.Position(0, consumed, False)) == (consumed, None)
        known = data.resumed_batches(loader)
        assert known == len(list(loader))
        # a batch sampler of the script's: its drop_last, not the DataLoader's (False)
        given = DataLoader(DATASET, batch_sampler=BatchSampler(split, 2, drop_last=drop_last))
        data.arm_skip(given, data.Position(0, consumed, False))
        assert data.resumed_batches(given) == len(list(given))
    plain = DataLoader(DATASET, batch_size=5, shuffle=True, drop_last=drop_last)
    data.arm_skip(plain, data.Position(0, consumed, False, order=list(range(24))))
    assert data.resumed_batches(plain) == len(list(plain))
    assert len(list(plain)) == (24 // 5 if drop_last else 5)  # the next pass: whole ...
    assert data.resumed_batches(plain) is None  # ... and not a resumed one
