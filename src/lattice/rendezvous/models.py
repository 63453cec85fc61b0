"""Request bodies of the rendezvous HTTP API, validated with pydantic.

Every body is strict (no type coercion, no unknown fields) so a malformed request gets a 400
that names the field instead of corrupting a job's state.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

NODE_ID_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._:-]{0,126}[A-Za-z0-9])?$"
NODE_ID_RE = re.compile(NODE_ID_PATTERN)
KV_KEY_RE = re.compile(r"^[A-Za-z0-9._:/-]{1,256}$")
MAX_NODES = 100_000
MAX_NPROC = 4096

NodeId = Annotated[str, StringConstraints(pattern=NODE_ID_PATTERN)]
Addr = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[^\s/]+$")]
Port = Annotated[int, Field(ge=1, le=65535)]
Generation = Annotated[int, Field(ge=1)]
NodeCount = Annotated[int, Field(ge=1, le=MAX_NODES)]
WaitS = Annotated[float, Field(ge=0, le=60)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Sizes(_Body):
    min_nodes: NodeCount
    max_nodes: NodeCount

    @model_validator(mode="after")
    def _min_le_max(self) -> _Sizes:
        if self.min_nodes > self.max_nodes:
            raise ValueError(
                f"min_nodes ({self.min_nodes}) is larger than max_nodes ({self.max_nodes})"
            )
        return self


class JoinBody(_Sizes):
    """Wait for a round that includes this node (re-sent with the same join_id while waiting)."""

    node_id: NodeId
    join_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    nproc: Annotated[int, Field(ge=1, le=MAX_NPROC)]
    addr: Addr
    port: Port
    last_generation: Generation | None = None
    wait_s: WaitS = 0.0


class WithdrawBody(_Body):
    node_id: NodeId
    join_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class NodeBody(_Body):
    node_id: NodeId


class HeartbeatBody(_Body):
    node_id: NodeId
    generation: Generation | None = None


class FailureBody(_Body):
    node_id: NodeId
    detail: Annotated[str, StringConstraints(max_length=4096)] = ""


class MemberBody(_Body):
    node_id: NodeId
    rank: Annotated[int, Field(ge=0, lt=MAX_NODES)]
    nproc: Annotated[int, Field(ge=1, le=MAX_NPROC)]
    addr: Addr
    port: Port


class RegisterBody(_Sizes):
    """A client re-asserts its running round after the service lost it (restart)."""

    node_id: NodeId
    generation: Generation
    members: Annotated[list[MemberBody], Field(min_length=1, max_length=MAX_NODES)]

    @model_validator(mode="after")
    def _consistent(self) -> RegisterBody:
        ranks = sorted(m.rank for m in self.members)
        if ranks != list(range(len(ranks))):
            raise ValueError("member ranks must be 0..n-1, each once")
        ids = [m.node_id for m in self.members]
        if len(set(ids)) != len(ids):
            raise ValueError("member node ids must be unique")
        if self.node_id not in ids:
            raise ValueError(f"node {self.node_id!r} is not among the members it registers")
        return self


class TargetBody(_Body):
    size: NodeCount | None


def describe(exc: ValidationError, limit: int = 3) -> str:
    """One line naming the bad fields (the first few) and what is wrong with each."""
    errors = exc.errors(include_url=False)
    if errors[0]["type"] == "json_invalid":
        return f"invalid JSON body: {errors[0]['msg']}"
    parts = []
    for err in errors[:limit]:
        where = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return f"invalid request: {'; '.join(parts)}{more}"
