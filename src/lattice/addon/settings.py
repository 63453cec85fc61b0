"""What the environment asks of the addon (``LATTICE_AUTOPATCH``, ``LATTICE_CHECKPOINT_EVERY``)."""

from __future__ import annotations

from lattice.addon import protocol


def autopatch_parts(env: dict[str, str]) -> set[str]:
    """What ``LATTICE_AUTOPATCH`` names (default ``torch,transformers``; ``none`` → nothing)."""
    setting = env.get(protocol.ENV_AUTOPATCH, "torch,transformers").strip().lower()
    return {part.strip() for part in setting.split(",")}


def autopatch_enabled(env: dict[str, str]) -> bool:
    """True when the addon should activate: a Lattice job, and autopatch not set to ``none``."""
    if not env.get(protocol.ENV_JOB):
        return False
    return "torch" in autopatch_parts(env)


def parse_every(raw: str | None) -> tuple[str, float]:
    """``N`` → ("steps", N); ``Ns`` → ("seconds", N); unset → ("auto", 0)."""
    if not raw:
        return ("auto", 0.0)
    text = raw.strip().lower()
    try:
        if text.endswith("s"):
            value = float(text[:-1])
            if value > 0:
                return ("seconds", value)
        elif int(text) > 0:
            return ("steps", float(int(text)))
    except ValueError:
        pass
    from lattice.common.errors import UserError

    raise UserError(f"LATTICE_CHECKPOINT_EVERY={raw!r}: expected N (steps) or Ns (seconds)")
