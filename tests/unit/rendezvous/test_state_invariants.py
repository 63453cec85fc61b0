"""The round state machine under random sequences of joins, leaves, failures and lost leases.

Drives `Rendezvous` directly with a controlled clock (settle timers are simulated by `tick`)
and checks what must hold whatever happens: generations only grow, rounds respect min and max,
ranks are compact, and nodes that stay keep their relative order.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lattice.rendezvous.models import JoinBody
from lattice.rendezvous.state import Rendezvous

NODES = [f"n{i}" for i in range(6)]
MIN, MAX = 2, 4

_join_op = st.tuples(st.just("join"), st.sampled_from(NODES))
_tick_op = st.tuples(st.just("tick"), st.sampled_from([0.1, 0.6, 2.0]))
op = st.one_of(  # agents join far more often than they fail; joins and ticks weigh more
    _join_op,
    _join_op,
    _join_op,
    _tick_op,
    st.tuples(st.just("leave"), st.sampled_from(NODES)),
    st.tuples(st.just("lose"), st.sampled_from(NODES)),
    st.tuples(st.just("fail"), st.integers(0, 5)),  # the i-th member of the running round
    st.tuples(st.just("fail"), st.integers(0, 5)),
    st.tuples(st.just("succeed"), st.integers(0, 5)),
    st.tuples(st.just("target"), st.sampled_from([None, 1, 2, 3, 5])),
    _tick_op,
)


class _Clocked(Rendezvous):
    t = 1000.0

    def now(self) -> float:  # type: ignore[override]
        return self.t


def _join(state: Rendezvous, node: str, join_id: str) -> None:
    body = JoinBody(
        node_id=node,
        join_id=join_id,
        nproc=1,
        addr="127.0.0.1",
        port=1,
        min_nodes=MIN,
        max_nodes=MAX,
    )
    state.join(state.must_job("job"), body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=20, max_size=80))
async def test_invariants_hold_for_any_sequence(ops: list[tuple[str, Any]]) -> None:
    state = _Clocked(settle_s=0.5, lease_s=3.0, rejoin_grace_s=1.5)
    state.started_at = state.t - 100
    job = state.must_job("job")
    rounds: list[tuple[int, list[str]]] = []
    left_since: set[str] = set()
    join_ids: dict[str, str] = {}
    for serial, (kind, arg) in enumerate(ops):
        running = job.running()
        if kind == "join":
            if arg not in job.waiters and (running is None or arg not in running.ids):
                join_ids[arg] = f"j{serial}"  # as agents do: not while waiting or in a round
            _join(state, arg, join_ids[arg])  # else a re-poll of its current join
        elif kind == "leave":
            state.leave(job, arg)
            left_since.add(arg)
        elif kind == "lose":
            state.lose(job, arg)
        elif kind in ("fail", "succeed") and running is not None:
            gen, member = running.generation, running.members[arg % len(running.members)]
            if kind == "fail":
                state.failure(job, gen, member.node_id, "boom")
            else:
                state.succeeded(job, gen, member.node_id)
        elif kind == "target":
            state.set_target(job, arg)
        elif kind == "tick":
            state.t += arg
            state.evaluate(job)  # what the settle timer would do
        rnd = job.round
        if rnd is not None and (not rounds or rounds[-1][0] != rnd.generation):
            ids = [m.node_id for m in rnd.members]
            assert [m.rank for m in rnd.members] == list(range(len(ids)))
            assert len(set(ids)) == len(ids)
            assert MIN <= len(ids) <= MAX
            if rounds:
                assert rnd.generation > rounds[-1][0]
                stayed = [n for n in rounds[-1][1] if n in ids and n not in left_since]
                assert stayed == [n for n in ids if n in stayed], "relative order changed"
            rounds.append((rnd.generation, ids))
            left_since = set()
        running = job.running()
        if running is not None:
            assert not (running.ids & set(job.waiters)) or running.succeeded, (
                "a node waits for a round while it is a member of the running one"
            )
        assert set(job.waiters) <= set(job.nodes)


async def test_lower_target_closes_with_target_nodes_and_keeps_the_rest_waiting() -> None:
    state = _Clocked(settle_s=600.0, lease_s=3.0, rejoin_grace_s=1.5)
    job = state.must_job("job")
    for i, node in enumerate(["a", "b", "c"]):
        _join(state, node, f"j{i}")
        state.t += 0.01
    assert job.round is None  # min 2 reached, but settle (600 s) has not passed
    state.set_target(job, 2)
    assert job.round is not None and [m.node_id for m in job.round.members] == ["a", "b"]
    assert list(job.waiters) == ["c"]
