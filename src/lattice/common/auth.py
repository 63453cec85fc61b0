"""Bearer tokens: one admin token per install, and per-job tokens derived from it.

A job token is ``ljt1.<payload>.<sig>`` where payload is base64url JSON ``{"job", "exp"}`` and
sig an HMAC-SHA256 over the payload keyed by the admin token. Services verify job tokens
without any shared state, and a job token only opens paths of its own job. The operator
gives worker pods a job token, never the admin token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass

TOKEN_ENV = "LATTICE_TOKEN"
_PREFIX = "ljt1"


def new_admin_token() -> str:
    """A fresh random admin token (for embedded services and `lattice up`)."""
    return secrets.token_urlsafe(32)


def token_from_env() -> str | None:
    value = os.environ.get(TOKEN_ENV, "").strip()
    return value or None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: str, payload: str) -> str:
    return _b64(hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest())


def job_token(secret: str, job: str, ttl_s: float | None = None) -> str:
    """A token that opens only ``job``'s data; expires after ``ttl_s`` seconds if given."""
    exp = None if ttl_s is None else int(time.time() + ttl_s)
    payload = _b64(json.dumps({"job": job, "exp": exp}, separators=(",", ":")).encode())
    return f"{_PREFIX}.{payload}.{_sign(secret, payload)}"


@dataclass(frozen=True)
class Caller:
    """Who made a request: the admin (any job) or one job."""

    admin: bool
    job: str | None = None

    def may_access(self, job: str) -> bool:
        return self.admin or self.job == job


class Authenticator:
    """Checks bearer tokens against the admin token; rejects revoked job tokens."""

    def __init__(self, admin_token: str) -> None:
        if not admin_token:
            raise ValueError("admin token must not be empty")
        self._admin = admin_token
        self._revoked: set[str] = set()

    def revoke(self, token: str) -> None:
        self._revoked.add(token)

    def identify(self, token: str | None) -> Caller | None:
        """The caller for ``token``, or None if it is missing, forged, expired or revoked."""
        if not token:
            return None
        if hmac.compare_digest(token.encode(), self._admin.encode()):
            return Caller(admin=True)
        if token in self._revoked:
            return None
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != _PREFIX:
            return None
        _, payload, sig = parts
        if not hmac.compare_digest(sig.encode(), _sign(self._admin, payload).encode()):
            return None
        try:
            claims = json.loads(_unb64(payload))
        except ValueError:
            return None
        if not isinstance(claims, dict) or not isinstance(claims.get("job"), str):
            return None
        exp = claims.get("exp")
        if exp is not None and (not isinstance(exp, int) or exp < time.time()):
            return None
        return Caller(admin=False, job=claims["job"])


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None
