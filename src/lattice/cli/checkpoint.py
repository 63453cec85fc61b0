"""`lattice checkpoint serve` and `lattice checkpoint list`."""

from __future__ import annotations

import json
import os
import time

import click

from lattice.common.auth import token_from_env
from lattice.common.errors import UserError


@click.group("checkpoint")
def checkpoint_group() -> None:
    """The checkpoint service: durable checkpoints with atomic commits and checksums."""


@checkpoint_group.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", default=29500, show_default=True, type=click.IntRange(0, 65535))
@click.option("--data", "data", default=None, help="directory for checkpoints (a PVC)")
@click.option("--storage", default=None, help="fsspec URL instead of --data, e.g. s3://bucket/p")
@click.option(
    "--storage-options",
    default=None,
    help='JSON options for the fsspec filesystem, e.g. \'{"endpoint_url": "…"}\'',
)
@click.option("--keep", default=3, show_default=True, type=click.IntRange(1, 1000))
@click.option("--token", default=None, help="admin token (default: $LATTICE_TOKEN)")
def serve(
    host: str,
    port: int,
    data: str | None,
    storage: str | None,
    storage_options: str | None,
    keep: int,
    token: str | None,
) -> None:
    """Serve checkpoints for any number of jobs until SIGINT/SIGTERM."""
    token = token or token_from_env()
    if not token:
        raise UserError("the checkpoint service needs a token: pass --token or set LATTICE_TOKEN")
    if bool(data) == bool(storage):
        raise UserError("give exactly one of --data DIR or --storage URL")
    url = storage or os.path.abspath(data or "")
    try:
        options = json.loads(storage_options) if storage_options else None
    except ValueError as exc:
        raise UserError(f"--storage-options is not valid JSON: {exc}") from exc
    from lattice.checkpoint.server import create_app
    from lattice.common.http import serve_forever

    try:
        app = create_app(token, url, keep=keep, storage_options=options)
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(f"cannot open checkpoint storage {url!r}: {exc}") from exc
    click.echo(f"lattice checkpoint: serving {url} on {host}:{port}", err=True)
    try:
        serve_forever(app, host, port)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


@checkpoint_group.command("list")
@click.option("--job", required=True, help="job id (the rendezvous id)")
@click.option(
    "--endpoint",
    default=lambda: os.environ.get("LATTICE_CHECKPOINT_ENDPOINT", "127.0.0.1:29500"),
    help="checkpoint service host:port (default: $LATTICE_CHECKPOINT_ENDPOINT)",
)
@click.option("--token", default=None, help="token (default: $LATTICE_TOKEN)")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def list_command(job: str, endpoint: str, token: str | None, output: str) -> None:
    """List a job's committed checkpoints, newest first."""
    from lattice.checkpoint.client import CheckpointClient
    from lattice.checkpoint.errors import CheckpointRejected, CheckpointUnavailable

    token = token or token_from_env()
    if not token:
        raise UserError("pass --token or set LATTICE_TOKEN")
    try:
        with CheckpointClient(endpoint, job, token, retry_for=2.0) as client:
            manifests = client.list()
    except (CheckpointUnavailable, CheckpointRejected) as exc:
        raise UserError(str(exc)) from exc
    if output == "json":
        click.echo(json.dumps([m.to_dict() for m in manifests], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("STEP", "ROUND", "CREATED", "SIZE", "SHARDS", box=None)  # newest first
    for m in manifests:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.created))
        table.add_row(str(m.step), str(m.round), created, f"{m.size:,}", str(len(m.shards)))
    Console().print(table)


def register(group: click.Group) -> None:
    """Add `lattice checkpoint …` to the `lattice` group."""
    group.add_command(checkpoint_group)
