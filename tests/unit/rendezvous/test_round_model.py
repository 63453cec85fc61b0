"""The client's Round arithmetic, endpoint parsing and the request models' messages."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lattice.rendezvous.client import Member, RendezvousClient, Round
from lattice.rendezvous.errors import RendezvousError
from lattice.rendezvous.models import JoinBody, RegisterBody, describe
from lattice.rendezvous.transport import base_url


def _round() -> Round:
    return Round(
        "job",
        7,
        (
            Member("a", 0, 2, "10.0.0.1", 29500),
            Member("b", 1, 4, "10.0.0.2", 29501),
            Member("c", 2, 1, "10.0.0.3", 29502),
        ),
    )


def test_round_world_size_offsets_and_master() -> None:
    r = _round()
    assert r.world_size == 7
    assert [r.rank_offset(n) for n in "abc"] == [0, 2, 6]
    assert (r.master_addr, r.master_port) == ("10.0.0.1", 29500)
    assert r.member("b").nproc == 4
    with pytest.raises(KeyError, match="not a member of round 7"):
        r.member("zz")


def test_endpoint_forms() -> None:
    assert base_url("h:1") == "http://h:1"
    assert base_url("https://h:1/") == "https://h:1"
    assert base_url("[::1]:29400") == "http://[::1]:29400"
    with pytest.raises(RendezvousError):
        base_url("  ")


def test_client_rejects_bad_ids_with_a_fix() -> None:
    with pytest.raises(RendezvousError, match="invalid node id"):
        RendezvousClient("h:1", "job", "no spaces", "t")
    with pytest.raises(RendezvousError, match="invalid job id"):
        RendezvousClient("h:1", "Job/../x", "n", "t")


def test_validation_message_names_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        JoinBody.model_validate_json(b'{"node_id": "n", "join_id": "j", "nproc": true}')
    message = describe(info.value)
    assert "nproc: Input should be a valid integer" in message
    assert "\n" not in message and "(and 2 more)" in message
    with pytest.raises(ValidationError) as info:
        JoinBody.model_validate_json(b"[")
    assert describe(info.value).startswith("invalid JSON body")


def test_register_needs_consistent_ranks_and_self() -> None:
    member = {"node_id": "a", "rank": 0, "nproc": 1, "addr": "h", "port": 1}
    base = {"node_id": "a", "generation": 3, "min_nodes": 1, "max_nodes": 2}
    assert RegisterBody.model_validate({**base, "members": [member]}).generation == 3
    for members, says in [
        ([member, {**member, "rank": 2, "node_id": "b"}], "ranks"),
        ([member, {**member, "rank": 1}], "unique"),
        ([{**member, "node_id": "b"}], "not among"),
    ]:
        with pytest.raises(ValidationError, match=says):
            RegisterBody.model_validate({**base, "members": members})
