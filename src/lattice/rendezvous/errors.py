"""Errors of the rendezvous client: each says what to do about it."""

from __future__ import annotations

from lattice.common.errors import UserError


class RendezvousError(UserError):
    """The service rejected a request (bad input, a full KV store): the message says why."""


class RendezvousUnreachable(UserError):
    """The service did not answer for longer than the client's ``unreachable_after``."""


class RendezvousAuthError(UserError):
    """The service refused the token (401) or the token does not open this job (403)."""


class RendezvousTimeout(TimeoutError):
    """No round formed within the time given to ``join``."""
