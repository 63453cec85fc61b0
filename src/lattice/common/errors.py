"""Errors a user can fix: shown as one line, never as a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in input (flags, specs, endpoints) with a message that says what to do.

    The CLI prints ``lattice: error: <message>`` and exits with ``exit_code``.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
