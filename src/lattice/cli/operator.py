"""`lattice operator`: the Kubernetes operator that runs TrainingJobs (both API groups)."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING

import click

from lattice.common.auth import token_from_env
from lattice.common.errors import UserError

if TYPE_CHECKING:
    from lattice.operator.kubernetes.api import KubeApi
    from lattice.operator.kubernetes.runner import OperatorProcess

DEFAULT_RENDEZVOUS = "lattice-rendezvous.lattice-system.svc:29400"


@click.command("operator")
@click.option("--namespace", "-n", default=None, help="watch TrainingJobs of this namespace only")
@click.option(
    "--all-namespaces",
    "-A",
    is_flag=True,
    help="watch TrainingJobs of all namespaces (the default)",
)
@click.option(
    "--rendezvous-endpoint",
    envvar="LATTICE_RENDEZVOUS_ENDPOINT",
    default=DEFAULT_RENDEZVOUS,
    show_default=True,
    help="HOST:PORT of the rendezvous service, as workers and the operator reach it",
)
@click.option(
    "--checkpoint-endpoint",
    envvar="LATTICE_CHECKPOINT_ENDPOINT",
    default=None,
    help="HOST:PORT of the checkpoint service (unset: node-local checkpoints only)",
)
@click.option("--metrics-port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--metrics-host", default="0.0.0.0", show_default=True, help="address to serve on")
@click.option("--token", default=None, help="admin token (default: $LATTICE_TOKEN)")
@click.option("--kubeconfig", default=None, help="kubeconfig (default: in-cluster, $KUBECONFIG)")
@click.option("--context", default=None, help="kubeconfig context")
@click.option(
    "--leader-elect/--no-leader-elect",
    default=True,
    show_default=True,
    help="hold a Lease so that only one replica acts",
)
@click.option(
    "--lease-namespace",
    envvar="POD_NAMESPACE",
    default="lattice-system",
    show_default=True,
    help="namespace of the leader Lease (default: $POD_NAMESPACE)",
)
@click.option("--lease-name", default="lattice-operator", show_default=True)
@click.option("--identity", default=None, help="this replica's name (default: $POD_NAME)")
@click.option(
    "--resync", default=30.0, show_default=True, type=click.FloatRange(min=1), help="seconds"
)
@click.option(
    "--resize-cooldown",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="seconds a resized job does not grow again",
)
@click.option(
    "--unschedulable-timeout",
    default=120.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="seconds before a job runs with the workers that could be scheduled",
)
@click.option(
    "--worker-grace",
    default=120,  # children.DEFAULT_WORKER_GRACE_S (imported lazily)
    show_default=True,
    type=click.IntRange(min=1),
    help="terminationGracePeriodSeconds of worker pods (templates may set their own)",
)
def operator(
    namespace: str | None,
    all_namespaces: bool,
    rendezvous_endpoint: str,
    checkpoint_endpoint: str | None,
    metrics_port: int,
    metrics_host: str,
    token: str | None,
    kubeconfig: str | None,
    context: str | None,
    leader_elect: bool,
    lease_namespace: str,
    lease_name: str,
    identity: str | None,
    resync: float,
    resize_cooldown: float,
    unschedulable_timeout: float,
    worker_grace: int,
) -> None:
    """Run the operator: keep every TrainingJob between minSize and maxSize worker pods."""
    if namespace and all_namespaces:
        raise UserError("--namespace and --all-namespaces exclude each other: pass one")
    token = token or token_from_env()
    if not token:
        raise UserError(
            "the operator needs the admin token: pass --token or set LATTICE_TOKEN "
            "(in a cluster, from the lattice-token Secret)"
        )
    if not rendezvous_endpoint.strip():
        raise UserError("--rendezvous-endpoint is empty: give HOST:PORT")
    # Imported here: `lattice --help` and the checks above stay fast.
    from lattice.operator.core import ReconcileConfig
    from lattice.operator.kubernetes.api import KubeApi
    from lattice.operator.kubernetes.controller import OperatorConfig, default_identity
    from lattice.operator.kubernetes.runner import LeaderConfig, OperatorProcess

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    api = KubeApi.connect(kubeconfig, context)
    config = OperatorConfig(
        admin_token=token,
        rendezvous_endpoint=rendezvous_endpoint.strip(),
        checkpoint_endpoint=(checkpoint_endpoint or "").strip() or None,
        namespace=namespace or None,
        identity=identity or default_identity(),
        resync_s=resync,
        resize_cooldown_s=resize_cooldown,
        reconcile=ReconcileConfig(unschedulable_timeout_s=unschedulable_timeout),
        worker_grace_s=worker_grace,
    )
    process = OperatorProcess(
        api,
        config,
        leader=LeaderConfig(namespace=lease_namespace, name=lease_name) if leader_elect else None,
        host=metrics_host,
        port=metrics_port,
    )
    scope = f"namespace {namespace}" if namespace else "all namespaces"
    click.echo(f"lattice operator: {config.identity} watching {scope}", err=True)
    try:
        asyncio.run(_serve(process, api))
    except OSError as exc:
        raise UserError(
            f"cannot serve on {metrics_host}:{metrics_port}: {exc.strerror or exc}"
        ) from exc


async def _serve(process: OperatorProcess, api: KubeApi) -> None:
    """Serve until SIGTERM/SIGINT, then stop cleanly (releasing the leader Lease)."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await process.serve()
    except asyncio.CancelledError:
        pass
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await api.close()


def register(group: click.Group) -> None:
    """Add `lattice operator` to the `lattice` group."""
    group.add_command(operator)
