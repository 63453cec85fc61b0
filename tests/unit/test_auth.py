"""Tokens: the admin token opens everything, a job token only its job, forgeries nothing."""

from __future__ import annotations

import time

from lattice.common.auth import Authenticator, bearer, job_token


def test_admin_and_job_tokens() -> None:
    auth = Authenticator("s3cret")
    assert auth.identify("s3cret").admin
    tok = job_token("s3cret", "job-a")
    who = auth.identify(tok)
    assert who is not None and not who.admin and who.job == "job-a"
    assert who.may_access("job-a") and not who.may_access("job-b")


def test_rejects_forged_expired_revoked_and_missing() -> None:
    auth = Authenticator("s3cret")
    assert auth.identify(None) is None
    assert auth.identify("") is None
    assert auth.identify("wrong") is None
    assert auth.identify(job_token("other-secret", "job-a")) is None
    forged = job_token("s3cret", "job-a").split(".")
    assert (
        auth.identify(".".join([forged[0], job_token("s3cret", "job-b").split(".")[1], forged[2]]))
        is None
    )
    assert auth.identify(job_token("s3cret", "job-a", ttl_s=-1)) is None
    tok = job_token("s3cret", "job-a", ttl_s=3600)
    assert auth.identify(tok) is not None
    auth.revoke(tok)
    assert auth.identify(tok) is None
    assert time.time() > 0


def test_bearer_header() -> None:
    assert bearer("Bearer abc") == "abc"
    assert bearer("bearer abc ") == "abc"
    assert bearer("Basic abc") is None
    assert bearer(None) is None
    assert bearer("Bearer ") is None
