"""How long N nodes take to agree on a round: Lattice's rendezvous vs torch's c10d rendezvous.

Lattice: a real `lattice rendezvous serve` process; N light clients (asyncio, one process) join
one job with min = max = N; the time runs from the first join until every client has its round.

torch: DynamicRendezvousHandler + C10dRendezvousBackend on a TCPStore (what torchrun uses with
`--rdzv-backend c10d`), N threads in a child process (one handler and store connection each),
min = max = N; the time runs from the release of all threads until every one has returned from
next_rendezvous(). The child is killed after --torch-cap seconds ("did not finish").

    python benchmarks/rendezvous_scale.py [--n 64 256 1024] [--torch-cap 60]

Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from _serve import wait_ready
from lattice.common.auth import new_admin_token
from lattice.rendezvous.client import RendezvousClient, Round, _round


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---------------------------------------------------------------------------- Lattice


async def _lattice_round(
    endpoint: str, token: str, n: int, job: str, freeze: bool
) -> dict[str, Any]:
    clients = [RendezvousClient(endpoint, job, f"node-{i}", token) for i in range(n)]
    # connected before the clock starts, as torch's store clients are below
    await asyncio.gather(*(c.job_status() for c in clients))
    if freeze:
        gc.freeze()  # N nodes share one heap here: don't let the collector rescan them all
    try:
        t0 = time.perf_counter()
        rounds = await asyncio.gather(
            *(
                c.join(nproc=8, addr="127.0.0.1", port=29500 + i, min_nodes=n, max_nodes=n)
                for i, c in enumerate(clients)
            )
        )
        elapsed = time.perf_counter() - t0
        generations = {r.generation for r in rounds}
        assert len(generations) == 1 and all(len(r.members) == n for r in rounds), "bad round"
        assert sorted(r.member(c.node_id).rank for r, c in zip(rounds, clients, strict=True)) == (
            list(range(n))
        )
        return {
            "seconds": round(elapsed, 4),
            "world_size": rounds[0].world_size,
            "one_node_decode_ms": _decode_ms(rounds[0]),
        }
    finally:
        await asyncio.gather(*(c.leave() for c in clients), return_exceptions=True)
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        gc.unfreeze()


def _decode_ms(rnd: Round) -> float:
    """What one node spends decoding this round's join answer (clients in one process share
    the decoded round, so the benchmark does not pay this N times on one core)."""
    members = [
        {"node_id": m.node_id, "rank": m.rank, "nproc": m.nproc, "addr": m.addr, "port": m.port}
        for m in rnd.members
    ]
    answer = {
        "status": "ready",
        "round": {"job": rnd.job, "generation": rnd.generation, "members": members},
        "lease_s": 3.0,
    }
    content = json.dumps(answer, separators=(",", ":")).encode()
    t0 = time.perf_counter()
    decoded = _round(json.loads(content)["round"])
    assert decoded == rnd
    return round((time.perf_counter() - t0) * 1000, 3)


def bench_lattice(ns: list[int], freeze: bool) -> dict[str, Any]:
    token, port = new_admin_token(), _free_port()
    env = {**os.environ, "LATTICE_TOKEN": token}
    server = subprocess.Popen(
        [sys.executable, "-m", "lattice", "rendezvous", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", server, "lattice rendezvous serve")
        results = {}
        for n in ns:
            results[str(n)] = asyncio.run(
                _lattice_round(f"127.0.0.1:{port}", token, n, f"bench-{n}", freeze)
            )
            print(f"lattice  n={n:5d}: {results[str(n)]['seconds']:.3f} s", file=sys.stderr)
        return results
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


# ---------------------------------------------------------------------------- torch c10d


def torch_worker(n: int, cap: float, freeze: bool) -> None:
    """Child process: N threads run torch's dynamic rendezvous; prints one JSON line."""
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # no extra store per round
    from datetime import timedelta

    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import (
        C10dRendezvousBackend,
    )
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    threading.stack_size(512 * 1024)
    master = TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=cap)
    )
    port = master.port
    ready = threading.Barrier(n + 1)
    done: list[float] = []
    errors: list[str] = []

    def node(i: int) -> None:
        store = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=cap))
        params = RendezvousParameters(
            backend="c10d",
            endpoint=f"127.0.0.1:{port}",
            run_id="bench",
            min_nodes=n,
            max_nodes=n,
            local_addr="127.0.0.1",
            join_timeout=int(cap),
        )
        handler = create_handler(store, C10dRendezvousBackend(store, "bench"), params)
        ready.wait()
        try:
            info = handler.next_rendezvous()
            assert info.world_size == n
            done.append(time.perf_counter())
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=node, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    if freeze:
        gc.freeze()
    ready.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    out = {"seconds": round(max(done) - t0, 4) if len(done) == n else None, "errors": errors[:3]}
    print(json.dumps(out), flush=True)
    os._exit(0)  # handlers' keep-alive threads would keep the process up


def bench_torch(ns: list[int], cap: float, freeze: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for n in ns:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--torch-worker", str(n), "--torch-cap", str(cap)]
            + ([] if freeze else ["--no-gc-freeze"]),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=cap + 30)  # + thread and store setup
            data = json.loads(out.strip().splitlines()[-1])
            if data["seconds"] is None:
                timeouts = all("Timeout" in e for e in data["errors"])
                why = (
                    f"did not finish within {cap:g} s" if timeouts else f"failed: {data['errors']}"
                )
                data = {"seconds": None, "note": why}
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            data = {"seconds": None, "note": f"did not finish within {cap:g} s"}
        results[str(n)] = data
        shown = f"{data['seconds']:.3f} s" if data["seconds"] is not None else data["note"]
        print(f"torch    n={n:5d}: {shown}", file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--torch-cap", type=float, default=60.0, help="seconds per torch run")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="let the garbage collector rescan all N simulated nodes (one heap) as it likes",
    )
    parser.add_argument("--torch-worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    _raise_fd_limit()
    if args.torch_worker is not None:
        torch_worker(args.torch_worker, args.torch_cap, not args.no_gc_freeze)
        return
    freeze = not args.no_gc_freeze
    lattice = bench_lattice(args.n, freeze)
    torch = {} if args.skip_torch else bench_torch(args.n, args.torch_cap, freeze)
    import torch as _torch

    result = {
        "benchmark": "rendezvous_scale",
        "torch_version": _torch.__version__,
        "metric": "seconds from first join until every node has its round (min = max = N)",
        "cpus": os.cpu_count(),
        "gc_freeze": freeze,
        "lattice": lattice,
        "torch_c10d": torch,
        "goal_1024_s": 2.0,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
