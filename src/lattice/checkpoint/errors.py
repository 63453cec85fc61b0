"""Checkpoint errors: corrupt data, an unreachable service, a rejected token."""

from __future__ import annotations

from lattice.common.errors import UserError


class CorruptCheckpoint(Exception):
    """A shard's bytes do not match its recorded sha256 or size, or its manifest is invalid."""


class CheckpointUnavailable(Exception):
    """The checkpoint service could not be reached within the retry bound."""


class CheckpointAuthError(UserError):
    """The service rejected the token (401/403)."""


class CheckpointRejected(Exception):
    """The service refused a request (4xx): the message says why."""


class RoundSuperseded(CheckpointRejected):
    """A newer round of the job has started: this round may no longer commit."""
