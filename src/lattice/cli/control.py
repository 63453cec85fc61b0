"""`lattice up` and the kubectl-like commands of the local control plane.

`up` runs the control plane in the foreground; `apply`, `get`, `describe`, `logs`, `delete`
and `slots` talk to it over its HTTP API, found through ``$LATTICE_HOME/endpoint`` and
``$LATTICE_HOME/token`` (mode 0600).
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import httpx
import yaml

from lattice.common.errors import UserError

RESOURCE_NAMES = ("trainingjob", "trainingjobs", "tj", "tjs")
home_option = click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="control plane state directory (default: $LATTICE_HOME or ~/.lattice)",
)
ns_option = click.option("-n", "--namespace", default=None, help="namespace (default: default)")


def _home(home: Path | None) -> Path:
    from lattice.operator.local.plane import default_home

    return home or default_home()


class Plane:
    """A client of a running `lattice up`."""

    def __init__(self, home: Path | None) -> None:
        self.home = _home(home)
        try:
            self.endpoint = (self.home / "endpoint").read_text().strip()
            token = (self.home / "token").read_text().strip()
        except FileNotFoundError:
            raise UserError(
                f"no local control plane at {self.home}: start it with `lattice up`"
            ) from None
        self._http = httpx.Client(
            base_url=f"http://{self.endpoint}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30.0,
        )

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError:
            raise UserError(
                f"no local control plane answers at {self.endpoint} ({self.home}): "
                "start it with `lattice up`"
            ) from None
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            raise UserError(message)
        return response.json()


def _age(created: str | None) -> str:
    if not created:
        return "-"
    then = datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    s = int(max(0, time.time() - then))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def _row(obj: dict[str, Any]) -> list[str]:
    status, spec, meta = obj.get("status") or {}, obj["spec"], obj["metadata"]
    return [
        meta["name"],
        status.get("phase", "Pending"),
        str(status.get("size", 0)),
        str(spec["minSize"]),
        str(spec["maxSize"]),
        str(status.get("restarts", 0)),
        _age(meta.get("creationTimestamp")),
    ]


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        click.echo("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _check_resource(resource: str) -> None:
    if resource.lower() not in RESOURCE_NAMES and not resource.lower().startswith("trainingjob"):
        raise UserError(f'the server doesn\'t have a resource type "{resource}" (use trainingjobs)')


@click.command("up")
@click.option("--slots", type=click.IntRange(min=1), default=None, help="capacity in workers")
@click.option("--image", "images", multiple=True, metavar="NAME=DIR", help="map an image to a dir")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=0, type=click.IntRange(0, 65535), help="API port (0: any free)")
@click.option("--resize-cooldown", default=10.0, show_default=True, type=click.FloatRange(0))
@click.option("--worker-grace", default=30.0, show_default=True, type=click.FloatRange(0))
@home_option
def up(
    slots: int | None,
    images: tuple[str, ...],
    host: str,
    port: int,
    resize_cooldown: float,
    worker_grace: float,
    home: Path | None,
) -> None:
    """Run the local control plane (operator, rendezvous, checkpoints) in the foreground."""
    import asyncio
    import logging

    from lattice.operator.local.daemon import serve
    from lattice.operator.local.plane import PlaneConfig

    mapped: dict[str, Path] = {}
    for item in images:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise UserError(f"--image {item!r}: use NAME=DIR")
        path = Path(directory).resolve()
        if not path.is_dir():
            raise UserError(f"--image {item!r}: {path} is not a directory")
        mapped[name] = path
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = PlaneConfig(
        home=_home(home).resolve(),
        slots=slots or max(1, os.cpu_count() or 1),
        images=mapped,
        resize_cooldown_s=resize_cooldown,
        worker_grace_s=worker_grace,
    )
    try:
        asyncio.run(serve(config, host, port))
    except OSError as exc:
        raise UserError(f"cannot start the control plane: {exc}") from exc


@click.command("apply")
@click.option("-f", "--filename", required=True, help="YAML/JSON file, or - for stdin")
@home_option
def apply(filename: str, home: Path | None) -> None:
    """Create or update TrainingJobs from a file."""
    if filename == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(filename).read_text()
        except OSError as exc:
            raise UserError(f"cannot read {filename}: {exc.strerror}") from exc
    from lattice.api import load_documents

    load_documents(text)  # validate here too: the error names the file's field at once
    results = Plane(home).call("POST", "/v1/apply", content=text.encode())["results"]
    for r in results:
        group = r["apiVersion"].split("/")[0]
        click.echo(f"trainingjob.{group}/{r['key'].split('/', 1)[1]} {r['result']}")


@click.command("get")
@click.argument("resource")
@click.argument("name", required=False)
@ns_option
@click.option("-A", "--all-namespaces", is_flag=True)
@click.option("-o", "--output", type=click.Choice(["wide", "json", "yaml", "name"]), default=None)
@home_option
def get(
    resource: str,
    name: str | None,
    namespace: str | None,
    all_namespaces: bool,
    output: str | None,
    home: Path | None,
) -> None:
    """List TrainingJobs, or show one."""
    _check_resource(resource)
    plane = Plane(home)
    ns = namespace or "default"
    if name:
        obj = plane.call("GET", f"/v1/trainingjobs/{ns}/{name}")
        items = [obj]
    else:
        params = {} if all_namespaces else {"namespace": ns}
        items = plane.call("GET", "/v1/trainingjobs", params=params)["items"]
    if output == "json":
        doc = items[0] if name else {"apiVersion": "v1", "kind": "List", "items": items}
        click.echo(json.dumps(doc, indent=2))
    elif output == "yaml":
        click.echo(yaml.safe_dump(items[0] if name else {"items": items}, sort_keys=False))
    elif output == "name":
        for obj in items:
            click.echo(f"trainingjob/{obj['metadata']['name']}")
    else:
        if not items:
            click.echo(f"No resources found in {ns} namespace.", err=True)
            return
        header = ["NAME", "PHASE", "SIZE", "MIN", "MAX", "RESTARTS", "AGE"]
        rows = [_row(o) for o in items]
        if all_namespaces:
            header = ["NAMESPACE", *header]
            rows = [[o["metadata"]["namespace"], *r] for o, r in zip(items, rows, strict=True)]
        if output == "wide":
            header += ["ROUND", "TARGET", "MESSAGE"]
            rows = [
                [
                    *r,
                    str((o.get("status") or {}).get("round", "-")),
                    str((o.get("status") or {}).get("targetSize", "-")),
                    (o.get("status") or {}).get("message", ""),
                ]
                for o, r in zip(items, rows, strict=True)
            ]
        _print_table(rows, header)


@click.command("describe")
@click.argument("resource")
@click.argument("name")
@ns_option
@home_option
def describe(resource: str, name: str, namespace: str | None, home: Path | None) -> None:
    """Status, conditions, workers and events of a TrainingJob."""
    _check_resource(resource)
    found = Plane(home).call("GET", f"/v1/trainingjobs/{namespace or 'default'}/{name}/describe")
    obj, status = found["object"], found["object"].get("status") or {}
    meta, spec = obj["metadata"], obj["spec"]
    container = spec["replicaSpecs"]["template"]["spec"]["containers"][0]
    from lattice.api import parse_job

    lines = [
        f"Name:         {meta['name']}",
        f"Namespace:    {meta['namespace']}",
        f"Job ID:       {parse_job(obj).job_id}  (rendezvous id, checkpoint scope)",
        f"API Version:  {obj['apiVersion']}",
        f"Created:      {meta.get('creationTimestamp', '-')}",
        f"Size:         {status.get('size', 0)} (target {status.get('targetSize', 0)}, "
        f"min {spec['minSize']}, max {spec['maxSize']})",
        f"Phase:        {status.get('phase', 'Pending')}",
        f"Round:        {status.get('round', '-')}",
        f"Restarts:     {status.get('restarts', 0)}",
        f"Image:        {container.get('image', '-')}",
        f"Command:      {' '.join(container.get('command') or [])}",
    ]
    if status.get("message"):
        lines.append(f"Message:      {status['message']}")
    if status.get("lastCheckpoint"):
        lines.append(f"Checkpoint:   {status['lastCheckpoint']}")
    lines.append("Conditions:")
    for c in status.get("conditions") or []:
        lines.append(
            f"  {c.get('type')}={c.get('status')}  {c.get('reason', '')}  "
            f"{c.get('message', '')}".rstrip()
        )
    lines.append("Workers:")
    for w in found["workers"]:
        code = "" if w["exitCode"] is None else f" exit {w['exitCode']}"
        lines.append(f"  {w['name']}  {w['phase']}{code}  pid {w['pid']}")
    lines.append("Events:")
    for e in found["events"]:
        stamp = datetime.fromtimestamp(e["time"]).strftime("%H:%M:%S")
        lines.append(f"  {stamp}  {e['type']:<7}  {e['reason']:<16}  {e['message']}")
    click.echo("\n".join(lines))


@click.command("logs")
@click.argument("name")
@ns_option
@click.option("-f", "--follow", is_flag=True, help="keep printing new output")
@click.option("--worker", type=int, default=None, help="only this worker index")
@home_option
def logs(
    name: str, namespace: str | None, follow: bool, worker: int | None, home: Path | None
) -> None:
    """Print the workers' output (with the agent's rank prefixes)."""
    plane = Plane(home)
    path = f"/v1/trainingjobs/{namespace or 'default'}/{name}/logs"
    offsets: dict[str, int] = {}
    while True:
        params: dict[str, Any] = {f"offset.{k}": v for k, v in offsets.items()}
        if worker is not None:
            params["worker"] = worker
        chunks = plane.call("GET", path, params=params)["logs"]
        for pod, chunk in chunks.items():
            text = chunk["text"]
            offsets[pod] = chunk["offset"]
            if text:
                prefix = f"[{pod}] " if len(chunks) > 1 else ""
                for line in text.splitlines():
                    click.echo(f"{prefix}{line}")
        if not follow:
            return
        time.sleep(0.5)


@click.command("delete")
@click.argument("resource")
@click.argument("name")
@ns_option
@home_option
def delete(resource: str, name: str, namespace: str | None, home: Path | None) -> None:
    """Delete a TrainingJob (its workers get a graceful stop and checkpoint)."""
    _check_resource(resource)
    Plane(home).call("DELETE", f"/v1/trainingjobs/{namespace or 'default'}/{name}")
    click.echo(f'trainingjob "{name}" deleted')


@click.command("slots")
@click.argument("count", type=click.IntRange(0, 4096), required=False)
@home_option
def slots(count: int | None, home: Path | None) -> None:
    """Show or change the local control plane's capacity (in workers)."""
    plane = Plane(home)
    if count is None:
        click.echo(plane.call("GET", "/v1/slots")["slots"])
    else:
        click.echo(plane.call("PUT", "/v1/slots", json={"slots": count})["slots"])


def register(group: click.Group) -> None:
    """Add the local control plane's commands to the `lattice` group."""
    for command in (up, apply, get, describe, logs, delete, slots):
        group.add_command(command)
