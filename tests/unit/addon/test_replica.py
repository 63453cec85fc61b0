"""Peer replicas of piece files: who replicates, and one exchange over a real gloo ring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from lattice.addon import local_tier, replica


@pytest.mark.parametrize(
    ("world", "local_world", "service", "want"),
    [
        (4, 2, False, True),  # two nodes of two ranks
        (2, 1, False, True),
        (2, 2, False, False),  # one node: no other node to hold a copy
        (4, 2, True, False),  # the service holds every piece
        (3, 2, False, False),  # nodes of unequal size: the ring would pair ranks of one node
        (4, 0, False, False),  # LOCAL_WORLD_SIZE unknown
    ],
)
def test_who_replicates(world: int, local_world: int, service: bool, want: bool) -> None:
    assert replica.wanted(world, local_world, service) is want


def _rank(rank: int, tmp: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp / 'store'}", rank=rank, world_size=2)
    ring = replica.Ring(dist, rank, 2, 1)
    mine = None
    if rank == 0:  # rank 1's write "failed": it has nothing to send, yet takes part
        mine = tmp / "shard-0-of-2.pt"
        local_tier.save(mine, {"piece": list(range(1000))})
    got = ring.exchange(mine)
    result: dict[str, object] = {"to": ring.to, "source": ring.source, "got": None}
    if got is not None:
        data, summary = got
        local_tier.store(tmp / f"replica-{rank}.pt", data, summary)
        result["got"] = summary
    (tmp / f"result-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_one_exchange_sends_a_file_and_nothing(tmp_path: Path) -> None:
    mp.start_processes(_rank, args=(tmp_path,), nprocs=2, join=True, start_method="spawn")
    zero, one = (json.loads((tmp_path / f"result-{r}.json").read_text()) for r in (0, 1))
    assert (zero["to"], zero["source"], one["to"], one["source"]) == (1, 1, 0, 0)
    assert zero["got"] is None  # rank 1 sent nothing
    assert one["got"] == local_tier.recorded(tmp_path / "shard-0-of-2.pt")
    assert local_tier.load(tmp_path / "replica-1.pt") == {"piece": list(range(1000))}
