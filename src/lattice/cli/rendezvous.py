"""`lattice rendezvous serve`: the rendezvous service in the foreground."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import click

from lattice.common.auth import token_from_env
from lattice.common.errors import UserError

if TYPE_CHECKING:
    from aiohttp import web

LISTEN_BACKLOG = 4096


@click.group("rendezvous")
def rendezvous_group() -> None:
    """The rendezvous service: job-scoped membership in numbered rounds."""


@rendezvous_group.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", default=29400, show_default=True, type=click.IntRange(0, 65535))
@click.option("--token", default=None, help="admin token (default: $LATTICE_TOKEN)")
@click.option(
    "--settle",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="seconds without a new joiner before a round closes below max size",
)
@click.option(
    "--lease",
    default=3.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="seconds without a heartbeat after which a node counts as lost",
)
@click.option(
    "--rejoin-grace",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="after a round ends, seconds to wait for its live members before settling without them",
)
def serve(
    host: str, port: int, token: str | None, settle: float, lease: float, rejoin_grace: float
) -> None:
    """Serve rendezvous for any number of jobs until SIGINT/SIGTERM."""
    token = token or token_from_env()
    if not token:
        raise UserError("the rendezvous service needs a token: pass --token or set LATTICE_TOKEN")
    from lattice.rendezvous.server import create_app

    app = create_app(token, settle_s=settle, lease_s=lease, rejoin_grace_s=rejoin_grace)
    click.echo(f"lattice rendezvous: serving on {host}:{port}", err=True)
    try:
        _serve(app, host, port)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def _serve(app: web.Application, host: str, port: int) -> None:
    """Like ``common.http.serve_forever``, with a listen backlog for a thousand agents that
    connect at once (the default 128 drops SYNs, which costs each dropped agent a second)."""
    from aiohttp import web

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    web.run_app(app, host=host, port=port, access_log=None, print=None, backlog=LISTEN_BACKLOG)


def register(group: click.Group) -> None:
    """Add `lattice rendezvous …` to the `lattice` group."""
    group.add_command(rendezvous_group)
