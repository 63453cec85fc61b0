"""`lattice run` flags: every torchrun spelling, parsed with argparse into `RunOptions`.

Torchrun users keep their command lines. Flags that only make sense for torchrun's own
machinery (start method, event log handler, NUMA binding …) are accepted and noted. Like
torchrun, any flag can also come from a ``PET_<NAME>`` environment variable (Kubeflow's
PyTorchJob sets those). Every mistake is a `UserError` with one line that says what to do.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any, NoReturn

from lattice.common.errors import UserError
from lattice.common.http import valid_job_id

DEFAULT_RDZV_PORT = 29400
DEFAULT_MAX_RESTARTS = 3
ACCEPTED_BACKENDS = ("lattice", "c10d", "static", "etcd", "etcd-v2")


@dataclass(frozen=True)
class Tuning:
    """``--rdzv-conf`` keys the agent understands (seconds unless named otherwise)."""

    settle_s: float = 1.0  # embedded service: wait this long for more joiners
    lease_s: float = 3.0  # embedded service: an agent silent this long is lost
    rejoin_grace_s: float = 30.0  # embedded service: wait this long for a round's members
    join_timeout_s: float = 600.0  # give up waiting for a round (torchrun's join_timeout)
    safepoint_timeout_s: float = 30.0  # graceful stop: wait this long for a safe point
    kill_grace_s: float = 3.0  # SIGTERM → SIGKILL
    save_grace_s: float = 60.0  # … longer for a worker saving its last step (it says so)
    request_timeout_s: float = 10.0
    unreachable_after_s: float = 60.0
    prewarm: bool = True  # keep a standby interpreter per local rank


# rdzv-conf key → (Tuning field, converter). Several spellings map to one field.
_CONF_KEYS: dict[str, str] = {
    "settle": "settle_s",
    "settle_s": "settle_s",
    "last_call": "settle_s",
    "last_call_timeout": "settle_s",
    "lease": "lease_s",
    "lease_s": "lease_s",
    "rejoin_grace": "rejoin_grace_s",
    "join_timeout": "join_timeout_s",
    "safepoint_timeout": "safepoint_timeout_s",
    "kill_grace": "kill_grace_s",
    "save_grace": "save_grace_s",
    "read_timeout": "request_timeout_s",
    "timeout": "request_timeout_s",
    "request_timeout": "request_timeout_s",
    "unreachable_after": "unreachable_after_s",
    "prewarm": "prewarm",
}
# torchrun/c10d keys with no meaning here: accepted silently apart from a note.
_IGNORED_CONF_KEYS = frozenset({"is_host", "store_type", "keep_alive_interval", "rank"})


@dataclass(frozen=True)
class RunOptions:
    """Everything `lattice run` was asked to do, validated."""

    min_nodes: int
    max_nodes: int
    nproc: int
    script: str
    script_args: tuple[str, ...]
    module: bool = False
    no_python: bool = False
    run_path: bool = False
    endpoint: str | None = None  # "host:port"; None → standalone embedded service
    job: str = ""
    max_restarts: int = DEFAULT_MAX_RESTARTS
    role: str = "default"
    local_addr: str | None = None
    master_addr: str | None = None
    master_port: int | None = None
    node_id: str = ""
    token: str | None = None
    log_dir: str | None = None
    local_ranks_filter: frozenset[int] | None = None
    checkpoint_endpoint: str | None = None
    tuning: Tuning = field(default_factory=Tuning)
    notes: tuple[str, ...] = ()  # things accepted but ignored, told to the user once

    @property
    def standalone(self) -> bool:
        return self.endpoint is None


class _Parser(argparse.ArgumentParser):
    """argparse that raises `UserError` instead of printing usage and exiting 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see `lattice run --help`)")


class _Env(argparse.Action):
    """torchrun's ``env`` action: the default comes from ``PET_<DEST>`` when set."""

    def __init__(self, dest: str, default: Any = None, required: bool = False, **kw: Any) -> None:
        env_name = "PET_" + dest.upper()
        default = os.environ.get(env_name, default)
        if default is not None:
            required = False
        super().__init__(dest=dest, default=default, required=required, **kw)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        setattr(namespace, self.dest, values)


class _CheckEnv(argparse.Action):
    """torchrun's ``check_env``: a switch that ``PET_<DEST>=1`` also turns on."""

    def __init__(self, dest: str, default: bool = False, **kw: Any) -> None:
        env_name = "PET_" + dest.upper()
        default = bool(int(os.environ[env_name])) if env_name in os.environ else default
        super().__init__(dest=dest, const=True, default=default, nargs=0, **kw)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        setattr(namespace, self.dest, True)


def build_parser() -> argparse.ArgumentParser:
    """The `lattice run` argument parser (torchrun's flags plus Lattice's own)."""
    p = _Parser(
        prog="lattice run",
        description="Run a training script on this node as part of an elastic job "
        "(a drop-in for torchrun). Without --rdzv-endpoint it runs standalone.",
        allow_abbrev=False,
    )
    a = p.add_argument
    a("--nnodes", action=_Env, default="1:1", help="MIN[:MAX] number of nodes")
    a("--nproc-per-node", "--nproc_per_node", action=_Env, default="1", help="N|gpu|cpu|auto")
    a("--rdzv-backend", "--rdzv_backend", action=_Env, default="lattice", help="accepted; ignored")
    a("--rdzv-endpoint", "--rdzv_endpoint", action=_Env, default="", help="HOST[:PORT]")
    a("--rdzv-id", "--rdzv_id", action=_Env, default=None, help="job id")
    a("--rdzv-conf", "--rdzv_conf", action=_Env, default="", help="k=v,... (settle, ...)")
    a("--standalone", action=_CheckEnv, help="embedded rendezvous on this machine")
    a("--max-restarts", "--max_restarts", action=_Env, default=str(DEFAULT_MAX_RESTARTS))
    a("--monitor-interval", "--monitor_interval", action=_Env, default=None, help="ignored")
    a("--start-method", "--start_method", action=_Env, default=None, help="accepted; ignored")
    a("--event-log-handler", "--event_log_handler", action=_Env, default=None, help="ignored")
    a("--role", action=_Env, default="default")
    a("-m", "--module", action=_CheckEnv, help="run SCRIPT as a module (python -m)")
    a("--no-python", "--no_python", action=_CheckEnv, help="run SCRIPT as an executable")
    a("--run-path", "--run_path", action=_CheckEnv, help="run SCRIPT with runpy.run_path")
    a("--log-dir", "--log_dir", action=_Env, default=None, help="also write worker logs here")
    a("-r", "--redirects", action=_Env, default="0", help="accepted; output is tee'd")
    a("-t", "--tee", action=_Env, default="0", help="accepted; output is tee'd")
    a("--local-ranks-filter", "--local_ranks_filter", action=_Env, default="")
    a("--duplicate-stdout-filters", "--duplicate_stdout_filters", action=_Env, default=None)
    a("--duplicate-stderr-filters", "--duplicate_stderr_filters", action=_Env, default=None)
    a("--node-rank", "--node_rank", action=_Env, default=None, help="static rendezvous only")
    a("--master-addr", "--master_addr", action=_Env, default=None, help="single node: MASTER_ADDR")
    a("--master-port", "--master_port", action=_Env, default=None, help="single node: MASTER_PORT")
    a("--local-addr", "--local_addr", action=_Env, default=None, help="this node's address")
    a("--logs-specs", "--logs_specs", default=None, help="accepted; ignored")
    a("--numa-binding", "--numa_binding", default=None, help="accepted; ignored")
    a("--signals-to-handle", "--signals_to_handle", action=_Env, default=None, help="ignored")
    a("--shutdown-timeout", "--shutdown_timeout", action=_Env, default=None, help="kill grace")
    a("--virtual-local-rank", "--virtual_local_rank", action=_CheckEnv, help="ignored")
    a("--token", default=None, help="rendezvous token (default: $LATTICE_TOKEN)")
    a("--node-id", "--node_id", action=_Env, default=None, help="stable id of this node")
    a("--checkpoint-endpoint", "--checkpoint_endpoint", default=None, help="HOST:PORT")
    a("training_script", nargs="?", default=None, help="script (or module with -m)")
    a("training_script_args", nargs=argparse.REMAINDER)
    return p


def parse_run_args(argv: list[str]) -> RunOptions:
    """Parse and validate `lattice run`'s arguments; `UserError` on anything wrong."""
    ns = build_parser().parse_args(argv)
    notes: list[str] = []
    if not ns.training_script:
        raise UserError("missing the training script: lattice run [flags] SCRIPT [ARGS ...]")
    min_nodes, max_nodes = parse_nnodes(ns.nnodes)
    nproc = resolve_nproc(ns.nproc_per_node)
    max_restarts = _int(ns.max_restarts, "--max-restarts", minimum=0)
    if ns.monitor_interval is not None:
        _float(ns.monitor_interval, "--monitor-interval", minimum=0.0)
        notes.append("--monitor-interval accepted; the agent reacts to events, it does not poll")
    if ns.module and ns.no_python:
        raise UserError("--module and --no-python cannot be combined: pick one")
    backend = str(ns.rdzv_backend).lower()
    if backend not in ACCEPTED_BACKENDS:
        raise UserError(
            f"unknown --rdzv-backend {ns.rdzv_backend!r}: use one of {', '.join(ACCEPTED_BACKENDS)}"
        )
    if backend != "lattice":
        notes.append(f"--rdzv-backend {backend} accepted; Lattice uses its own rendezvous")
    tuning, conf_notes = parse_rdzv_conf(ns.rdzv_conf)
    notes.extend(conf_notes)
    if ns.shutdown_timeout is not None:
        grace = _float(ns.shutdown_timeout, "--shutdown-timeout", minimum=0.0)
        tuning = Tuning(**{**tuning.__dict__, "kill_grace_s": grace})
    for flag, value in (
        ("--start-method", ns.start_method),
        ("--event-log-handler", ns.event_log_handler),
        ("--logs-specs", ns.logs_specs),
        ("--numa-binding", ns.numa_binding),
        ("--signals-to-handle", ns.signals_to_handle),
        ("--duplicate-stdout-filters", ns.duplicate_stdout_filters),
        ("--duplicate-stderr-filters", ns.duplicate_stderr_filters),
    ):
        if value is not None:
            notes.append(f"{flag} accepted and ignored")
    if ns.virtual_local_rank:
        notes.append("--virtual-local-rank accepted and ignored")

    endpoint: str | None = None
    if ns.rdzv_endpoint and not ns.standalone:
        endpoint = parse_endpoint(ns.rdzv_endpoint, "--rdzv-endpoint", DEFAULT_RDZV_PORT)
    if endpoint is None and max_nodes > 1:
        raise UserError(
            f"--nnodes {ns.nnodes} spans several nodes: pass --rdzv-endpoint HOST:PORT of a "
            "`lattice rendezvous serve` (standalone mode is one node)"
        )
    job = ns.rdzv_id if ns.rdzv_id not in (None, "", "none") else None
    if job is None:
        if endpoint is not None:
            raise UserError("--rdzv-id is required with --rdzv-endpoint: name the job")
        job = f"local-{uuid.uuid4().hex[:8]}"
    if not valid_job_id(job):
        raise UserError(
            f"invalid --rdzv-id {job!r}: use lowercase letters, digits, '-', '_', '.' "
            "(start and end with a letter or digit)"
        )
    master_port = None
    if ns.master_port is not None:
        master_port = _int(ns.master_port, "--master-port", minimum=1, maximum=65535)
    if (ns.master_addr or master_port) and endpoint is not None:
        notes.append("--master-addr/--master-port apply to standalone runs only; ignored")
    if ns.node_rank not in (None, "0", 0):
        notes.append("--node-rank is for static rendezvous; Lattice assigns node ranks")
    token = ns.token or os.environ.get("LATTICE_TOKEN", "").strip() or None
    if endpoint is not None and token is None:
        raise UserError(
            "no token for the rendezvous service: pass --token or set LATTICE_TOKEN "
            "(the service's admin token or a job token)"
        )
    ckpt = ns.checkpoint_endpoint or os.environ.get("LATTICE_CHECKPOINT_ENDPOINT") or None
    if ckpt is not None:
        parse_endpoint(ckpt, "--checkpoint-endpoint", None)
    return RunOptions(
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        nproc=nproc,
        script=ns.training_script,
        script_args=tuple(ns.training_script_args),
        module=ns.module,
        no_python=ns.no_python and not ns.run_path,
        run_path=ns.run_path,
        endpoint=endpoint,
        job=job,
        max_restarts=max_restarts,
        role=ns.role,
        local_addr=ns.local_addr,
        master_addr=ns.master_addr if endpoint is None else None,
        master_port=master_port if endpoint is None else None,
        node_id=ns.node_id or default_node_id(),
        token=token,
        log_dir=ns.log_dir,
        local_ranks_filter=_ranks_filter(ns.local_ranks_filter),
        checkpoint_endpoint=ckpt,
        tuning=tuning,
        notes=tuple(notes),
    )


def parse_nnodes(text: str) -> tuple[int, int]:
    """``N`` or ``MIN:MAX`` → (min, max), with 1 <= min <= max."""
    parts = str(text).split(":")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise UserError(f"invalid --nnodes {text!r}: use N or MIN:MAX, e.g. --nnodes 1:3")
    lo, hi = int(parts[0]), int(parts[-1])
    if lo < 1:
        raise UserError(f"invalid --nnodes {text!r}: the minimum must be at least 1")
    if lo > hi:
        raise UserError(f"invalid --nnodes {text!r}: MIN ({lo}) is larger than MAX ({hi})")
    return lo, hi


def resolve_nproc(value: str) -> int:
    """torchrun's ``--nproc-per-node``: a number, or gpu / cpu / auto."""
    text = str(value).strip().lower()
    if text.isdigit():
        if int(text) < 1:
            raise UserError("--nproc-per-node must be at least 1")
        return int(text)
    if text == "cpu":
        return _cpu_count()
    if text in ("gpu", "auto"):
        import torch  # only here: importing torch costs seconds

        if torch.cuda.is_available():
            return torch.cuda.device_count()
        if text == "gpu":
            raise UserError("--nproc-per-node gpu: CUDA is not available here; use N or cpu")
        return _cpu_count()
    raise UserError(f"invalid --nproc-per-node {value!r}: use a number, gpu, cpu or auto")


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def parse_rdzv_conf(text: str) -> tuple[Tuning, list[str]]:
    """``k=v,k=v`` → `Tuning`, plus notes about keys that mean nothing here."""
    values: dict[str, Any] = {}
    notes: list[str] = []
    for item in filter(None, (s.strip() for s in str(text or "").split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not sep or not key:
            raise UserError(f"invalid --rdzv-conf item {item!r}: use key=value,key=value")
        target = _CONF_KEYS.get(key)
        if target is None:
            if key not in _IGNORED_CONF_KEYS:
                notes.append(f"--rdzv-conf {key} is not used by Lattice; ignored")
            continue
        if target == "prewarm":
            values[target] = _bool(raw, f"--rdzv-conf {key}")
        else:
            values[target] = _float(raw, f"--rdzv-conf {key}", minimum=0.0)
    return Tuning(**values), notes


def parse_endpoint(text: str, flag: str, default_port: int | None) -> str:
    """``HOST[:PORT]`` (IPv6 as ``[addr]:port``) → normalised ``host:port``."""
    raw = str(text).strip()
    for scheme in ("http://", "https://"):
        if raw.startswith(scheme):
            raw = raw[len(scheme) :].rstrip("/")
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::(\d+))?|([A-Za-z0-9_.-]+)(?::(\d+))?", raw)
    if not m:
        raise UserError(f"invalid {flag} {text!r}: use HOST:PORT, e.g. 10.0.0.5:29400")
    host = m.group(1) or m.group(3)
    port_text = m.group(2) or m.group(4)
    if m.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise UserError(f"invalid {flag} {text!r}: {host!r} is not an IPv6 address") from exc
    if port_text is None:
        if default_port is None:
            raise UserError(f"invalid {flag} {text!r}: add the port, HOST:PORT")
        port = default_port
    else:
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise UserError(f"invalid {flag} {text!r}: the port must be 1-65535")
    return f"[{host}]:{port}" if m.group(1) else f"{host}:{port}"


def default_node_id() -> str:
    """A node id unique to this agent: ``$LATTICE_NODE_ID``, else host name and pid."""
    explicit = os.environ.get("LATTICE_NODE_ID", "").strip()
    if explicit:
        return explicit
    host = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-") or "node"
    return f"{host}-{os.getpid()}"


def _ranks_filter(text: str) -> frozenset[int] | None:
    if not text:
        return None
    try:
        ranks = frozenset(int(x) for x in str(text).split(",") if x.strip())
    except ValueError as exc:
        raise UserError(
            f"invalid --local-ranks-filter {text!r}: use comma-separated local ranks, e.g. 0,1"
        ) from exc
    return ranks or None


def _int(value: Any, flag: str, minimum: int, maximum: int | None = None) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"invalid {flag} {value!r}: expected a whole number") from exc
    if out < minimum or (maximum is not None and out > maximum):
        bound = f"{minimum}-{maximum}" if maximum is not None else f">= {minimum}"
        raise UserError(f"invalid {flag} {value!r}: expected {bound}")
    return out


def _float(value: Any, flag: str, minimum: float) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"invalid {flag} {value!r}: expected a number of seconds") from exc
    if not out >= minimum:
        raise UserError(f"invalid {flag} {value!r}: expected a number >= {minimum}")
    return out


def _bool(value: str, flag: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise UserError(f"invalid {flag} {value!r}: use 1 or 0")
