"""The manifest: what makes a checkpoint visible, and what its shards must hash to."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from lattice.checkpoint.errors import CorruptCheckpoint
from lattice.checkpoint.names import check_shard, check_step

FORMAT = 1
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_META_BYTES = 1 << 20


@dataclass(frozen=True)
class ShardInfo:
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}

    @classmethod
    def parse(cls, raw: Any) -> ShardInfo:
        if not isinstance(raw, dict):
            raise ValueError("shard info must be an object with sha256 and size")
        sha, size = raw.get("sha256"), raw.get("size")
        if not isinstance(sha, str) or not SHA_RE.match(sha):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError("size must be a non-negative integer")
        return cls(sha, size)


@dataclass(frozen=True)
class Manifest:
    job: str
    step: int
    created: float
    shards: dict[str, ShardInfo]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(s.size for s in self.shards.values())

    @property
    def round(self) -> int:
        """The rendezvous round that committed it (``meta["round"]``; 0 when it has none)."""
        value = self.meta.get("round", 0)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    @property
    def order(self) -> tuple[int, int]:
        """Newer sorts higher: a round that restored step R commits R + 1, R + 2, …, so a
        higher step from an older round is a history that a newer round abandoned (a late
        commit from a node that was cut off) and must not win over it."""
        return self.round, self.step

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "job": self.job,
            "step": self.step,
            "created": self.created,
            "shards": {name: info.to_dict() for name, info in sorted(self.shards.items())},
            "meta": self.meta,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True).encode()

    @classmethod
    def parse(cls, raw: Any) -> Manifest:
        """A manifest from its JSON form; raises CorruptCheckpoint if anything is off."""
        try:
            if isinstance(raw, bytes | str):
                raw = json.loads(raw)
            if not isinstance(raw, dict) or raw.get("format") != FORMAT:
                raise ValueError("not a format-1 manifest")
            shards = raw["shards"]
            if not isinstance(shards, dict):
                raise ValueError("shards must be an object")
            meta = raw.get("meta", {})
            if not isinstance(meta, dict):
                raise ValueError("meta must be an object")
            created = raw["created"]
            if not isinstance(created, int | float):
                raise ValueError("created must be a number")
            return cls(
                job=str(raw["job"]),
                step=check_step(raw["step"]),
                created=float(created),
                shards={check_shard(k): ShardInfo.parse(v) for k, v in shards.items()},
                meta=meta,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptCheckpoint(f"invalid manifest: {exc}") from exc
