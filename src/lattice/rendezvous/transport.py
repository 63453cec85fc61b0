"""HTTP transport of the rendezvous clients: endpoint parsing, auth, retries with backoff.

Transient trouble (connection refused or reset, a service restarting, 502/503/504) is retried
with exponential backoff for up to ``unreachable_after`` seconds; then the caller gets
``RendezvousUnreachable`` with a message that says how to fix it.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from typing import Any

import httpx

from lattice.rendezvous.errors import RendezvousAuthError, RendezvousError, RendezvousUnreachable

_TRANSIENT = (httpx.TransportError,)  # connect/read/write errors, timeouts, protocol errors
_RETRY_STATUS = frozenset({502, 503, 504})
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 0.5


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context per process: building one per client costs milliseconds each."""
    return ssl.create_default_context()


def base_url(endpoint: str) -> str:
    """``host:port`` (or a full ``http(s)://`` URL) as the clients' base URL."""
    text = endpoint.strip().rstrip("/")
    if not text:
        raise RendezvousError("empty rendezvous endpoint: use HOST:PORT")
    return text if "://" in text else f"http://{text}"


class Transport:
    """One httpx.AsyncClient to one service, with the bearer token and retry rules."""

    def __init__(
        self, endpoint: str, token: str | None, *, request_timeout: float, unreachable_after: float
    ) -> None:
        self.endpoint = endpoint
        self.request_timeout = request_timeout
        self.unreachable_after = unreachable_after
        self.backoff_max = BACKOFF_MAX_S
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=base_url(endpoint),
            headers=headers,
            timeout=request_timeout,
            verify=_tls(),
            trust_env=False,
        )

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        params: dict[str, Any] | None = None,
        hold: float = 0.0,
        retry: bool = True,
    ) -> httpx.Response:
        """A request; 2xx and 404 come back, other answers raise. ``hold``: long-poll seconds."""
        timeout = httpx.Timeout(self.request_timeout, read=self.request_timeout + hold)
        loop = asyncio.get_running_loop()
        started = loop.time()
        delay = BACKOFF_FIRST_S
        while True:
            try:
                response = await self._http.request(
                    method, path, json=json, content=content, params=params, timeout=timeout
                )
            except _TRANSIENT as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if response.status_code not in _RETRY_STATUS:
                    return self._check(response)
                problem = f"HTTP {response.status_code}: {_message(response)}"
            if not retry or loop.time() - started + delay > self.unreachable_after:
                raise RendezvousUnreachable(
                    f"rendezvous service at {self.endpoint} is not reachable ({problem}): start "
                    "it with `lattice rendezvous serve` or check --rdzv-endpoint"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    def _check(self, response: httpx.Response) -> httpx.Response:
        status = response.status_code
        if status < 400 or status == 404:
            return response
        if status in (401, 403):
            raise RendezvousAuthError(
                f"rendezvous service at {self.endpoint} refused the token ({status}: "
                f"{_message(response)}): check LATTICE_TOKEN or --token"
            )
        raise RendezvousError(
            f"rendezvous service at {self.endpoint} rejected the request ({status}): "
            f"{_message(response)}"
        )

    async def close(self) -> None:
        await self._http.aclose()


def _message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return data["error"]
    return str(data)[:200]


def error_code(response: httpx.Response) -> str | None:
    """The ``code`` of a JSON error answer (e.g. ``unknown_round``), if any."""
    try:
        data = response.json()
    except ValueError:
        return None
    return data.get("code") if isinstance(data, dict) else None
