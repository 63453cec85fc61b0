"""The addon's settings, read from the environment the agent gives a training process."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lattice.addon import protocol as p
from lattice.common.errors import UserError

DEFAULT_AUTOPATCH = frozenset({"torch", "transformers"})
KNOWN_PATCHES = frozenset({"torch", "transformers"})


@dataclass(frozen=True)
class Every:
    """A checkpoint interval: ``steps`` or ``seconds``; neither → automatic."""

    steps: int | None = None
    seconds: float | None = None

    @property
    def auto(self) -> bool:
        return self.steps is None and self.seconds is None


def parse_every(text: str | None) -> Every:
    """``N`` (steps), ``Ns`` (seconds), empty or ``auto`` → automatic."""
    raw = (text or "").strip().lower()
    if raw in ("", "auto"):
        return Every()
    try:
        if raw.endswith("s"):
            seconds = float(raw[:-1])
            if seconds > 0:
                return Every(seconds=seconds)
        else:
            steps = int(raw)
            if steps > 0:
                return Every(steps=steps)
    except ValueError:
        pass
    raise UserError(
        f"{p.ENV_EVERY}={text!r} is not an interval: use N (steps, e.g. 100), "
        "Ns (seconds, e.g. 300s) or leave it unset for automatic"
    )


def parse_autopatch(text: str | None) -> frozenset[str]:
    """``torch,transformers`` (default), a subset of it, or ``none``."""
    raw = (text or "").strip().lower()
    if not raw:
        return DEFAULT_AUTOPATCH
    if raw == "none":
        return frozenset()
    parts = frozenset(x.strip() for x in raw.split(",") if x.strip())
    unknown = parts - KNOWN_PATCHES
    if unknown:
        raise UserError(
            f"{p.ENV_AUTOPATCH}={text!r}: unknown {sorted(unknown)}; "
            "use a comma list of torch, transformers, or none"
        )
    return parts


@dataclass(frozen=True)
class AddonConfig:
    job: str
    rank: int
    world_size: int
    local_rank: int
    local_dir: Path
    endpoint: str | None
    token: str | None
    control_file: Path | None
    every: Every
    keep: int | None
    patches: frozenset[str]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AddonConfig:
        env = os.environ if env is None else env
        job = env.get(p.ENV_JOB, "").strip()
        if not job:
            raise UserError(f"{p.ENV_JOB} is not set: the addon runs only under `lattice run`")
        local = env.get(p.ENV_LOCAL_DIR, "").strip()
        local_dir = Path(local) if local else Path(tempfile.gettempdir()) / "lattice-ckpt" / job
        keep_raw = env.get(p.ENV_KEEP, "").strip()
        control = env.get(p.ENV_CONTROL_FILE, "").strip()
        return cls(
            job=job,
            rank=_int(env, "RANK", 0),
            world_size=max(1, _int(env, "WORLD_SIZE", 1)),
            local_rank=_int(env, "LOCAL_RANK", 0),
            local_dir=local_dir,
            endpoint=env.get(p.ENV_ENDPOINT, "").strip() or None,
            token=env.get(p.ENV_TOKEN, "").strip() or None,
            control_file=Path(control) if control else None,
            every=parse_every(env.get(p.ENV_EVERY)),
            keep=int(keep_raw) if keep_raw.isdigit() and int(keep_raw) > 0 else None,
            patches=parse_autopatch(env.get(p.ENV_AUTOPATCH)),
        )


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key, "").strip()
    try:
        return int(raw) if raw else default
    except ValueError as exc:
        raise UserError(f"{key}={raw!r} is not an integer") from exc
