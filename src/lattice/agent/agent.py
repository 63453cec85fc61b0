"""The agent's round loop: join a round, run this node's workers, react to how the round ends.

One loop per node. The rendezvous service decides rounds; the agent only reports what it
sees (a worker failed, all workers succeeded) and obeys round ends pushed to it. Everything a
round creates is named by its generation. Failures are counted job-wide (`failures`), so every
agent, also one that joined late, agrees when ``--max-restarts`` is used up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lattice.agent.embedded import EmbeddedRendezvous, start_embedded
from lattice.agent.env import (
    NodeSetup,
    RoundPlacement,
    addon_active,
    local_ckpt_dir,
    node_env,
    round_env,
)
from lattice.agent.failures import KEY_PREFIX, FailureLedger
from lattice.agent.logline import ROUND_FORMAT
from lattice.agent.options import RunOptions
from lattice.agent.output import Sink, drain_all
from lattice.agent.ports import PortReservation
from lattice.agent.protocol import SAFEPOINT_EXIT, bootstrap_dir
from lattice.agent.standby import StandbyPool
from lattice.agent.workers import (
    Program,
    Worker,
    as_python_program,
    describe_exit,
    start_worker,
    stop_workers,
)
from lattice.common import node_local
from lattice.common.errors import UserError

if TYPE_CHECKING:
    from lattice.rendezvous.client import RendezvousClient, Round, RoundEnd

log = logging.getLogger("lattice.agent")

STANDBY_DELAY_S = 3.0  # start next round's standbys this long after a round's workers
STARTUP_WARM_S = 60.0  # at most this long warming standbys before the first join
END_AFTER_REPORT_S = 15.0  # after reporting a failure, wait this long for the pushed round end


@dataclass(frozen=True)
class Outcome:
    """How one round ended for this agent."""

    kind: str  # succeeded | ended | stopped
    end: RoundEnd | None = None


class Agent:
    """`lattice run` on one node."""

    def __init__(self, opts: RunOptions, env: dict[str, str] | None = None) -> None:
        self.opts = opts
        self._base_env = dict(os.environ if env is None else env)
        mode = "module" if opts.module else "exec" if opts.no_python else "script"
        python = self._base_env.get("PYTHON_EXEC", sys.executable)
        cwd = os.getcwd()
        self.program = Program(opts.script, opts.script_args, mode, python, cwd)
        if mode == "exec":
            self.program = as_python_program([opts.script, *opts.script_args], cwd) or self.program
        bootstrap = bootstrap_dir()
        self._bootstrap = bootstrap if addon_active(self._base_env, bootstrap) else None
        self._ledger = FailureLedger(opts.node_id)
        self._workers: list[Worker] = []
        self._stop_signal: int | None = None
        self._stop: asyncio.Event | None = None
        self._run_dir: Path | None = None
        self._control: Path | None = None  # the round's control file (saving markers beside it)
        self._pool: StandbyPool | None = None
        self._node_envs: list[dict[str, str]] = []

    # ---------------------------------------------------------------- entry point

    async def run(self) -> int:
        """Run until the job succeeds (0), fails for good, or the agent is stopped."""
        self._check_program()
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        for note in self.opts.notes:
            log.info("note: %s", note)
        embedded: EmbeddedRendezvous | None = None
        client: RendezvousClient | None = None
        try:
            token, endpoint = self.opts.token, self.opts.endpoint
            if endpoint is None:
                tuning = self.opts.tuning
                embedded = start_embedded(tuning.settle_s, tuning.lease_s, tuning.rejoin_grace_s)
                token, endpoint = embedded.token, embedded.endpoint
                log.info("standalone: embedded rendezvous on %s, job %s", endpoint, self.opts.job)
            from lattice.rendezvous.client import RendezvousClient

            client = RendezvousClient(
                endpoint,
                self.opts.job,
                self.opts.node_id,
                token or "",
                request_timeout=self.opts.tuning.request_timeout_s,
                unreachable_after=self.opts.tuning.unreachable_after_s,
            )
            self._prepare(token)
            if not await self._warm_up(client):
                await self._leave(client)
                return 128 + (self._stop_signal or signal.SIGTERM)
            return await self._rounds(client, endpoint)
        finally:
            await self._shutdown(client, embedded)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _check_program(self) -> None:
        if self.program.mode == "script" and not os.path.isfile(self.program.target):
            raise UserError(
                f"training script {self.program.target!r} not found "
                f"(relative to {self.program.cwd}); use -m for a module"
            )
        if self.program.mode == "exec" and shutil.which(self.program.target) is None:
            raise UserError(f"--no-python: {self.program.target!r} is not an executable on PATH")

    def _prepare(self, token: str | None) -> None:
        opts = self.opts
        setup = NodeSetup(
            job=opts.job,
            node_id=opts.node_id,
            nproc=opts.nproc,
            role=opts.role,
            max_restarts=opts.max_restarts,
            token=token,
            checkpoint_endpoint=opts.checkpoint_endpoint,
            bootstrap=self._bootstrap,
        )
        self._node_envs = [node_env(self._base_env, setup, i) for i in range(opts.nproc)]
        ckpt = local_ckpt_dir(opts.job, opts.node_id)
        with contextlib.suppress(OSError):
            ckpt.mkdir(parents=True, exist_ok=True, mode=0o700)
        if note := node_local.small_shm_note():
            log.info("%s", note)
        self._run_dir = Path(tempfile.mkdtemp(prefix=f"lattice-{opts.job}-"))
        if opts.tuning.prewarm and self.program.mode != "exec":
            self._pool = StandbyPool(self.program, self._node_envs, self._bootstrap, self._sinks)

    async def _warm_up(self, client: RendezvousClient) -> bool:
        """Import torch in this node's standbys before joining; False if stopped meanwhile.

        A node joining a running job ends its round (a resize): joining only once warm keeps
        the others' pause short. Bounded: a slow import only means joining with cold standbys.
        Meanwhile one request checks the service answers and takes the token, so a wrong
        endpoint or token fails at once rather than after the warm-up.
        """
        assert self._stop is not None
        check = asyncio.ensure_future(client.kv_get(KEY_PREFIX + self.opts.node_id))
        if self._pool is None:
            await check
            return True
        started = time.monotonic()
        await self._pool.fill(idle=False)
        warm = asyncio.ensure_future(self._pool.wait_warm(STARTUP_WARM_S))
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            pending = {warm, stop, check}
            while warm in pending and stop in pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if check in done:
                    check.result()  # raises RendezvousUnreachable / RendezvousAuthError
            if stop.done():
                return False
            await check
        finally:
            for task in (warm, stop, check):
                task.cancel()
        log.info("standby interpreters warm in %.1f s", time.monotonic() - started)
        return True

    def _sinks(self, local_rank: int) -> tuple[Sink, Sink]:
        shown = self.opts.local_ranks_filter is None or local_rank in self.opts.local_ranks_filter
        return (
            Sink(sys.stdout.buffer if shown else None),
            Sink(sys.stderr.buffer if shown else None),
        )

    def _on_signal(self, sig: int) -> None:
        assert self._stop is not None
        if self._stop_signal is None:
            self._stop_signal = sig
            log.info("received %s: stopping workers, then leaving", signal.Signals(sig).name)
            self._stop.set()
            return
        log.info("received %s again: killing workers now", signal.Signals(sig).name)
        for worker in self._workers:
            worker.signal(signal.SIGKILL)

    # ---------------------------------------------------------------- rounds

    async def _rounds(self, client: RendezvousClient, endpoint: str) -> int:
        addr = self._local_address(endpoint)
        while True:
            reservation = PortReservation()
            try:
                rnd = await self._join(client, addr, reservation.port, endpoint)
            except BaseException:
                reservation.release()
                raise
            if rnd is None:
                reservation.release()
                await self._leave(client)
                return 128 + (self._stop_signal or signal.SIGTERM)
            restarts = await self._ledger.agree(client, rnd)
            outcome = await self._run_round(client, rnd, reservation, restarts)
            if outcome.kind == "succeeded":
                log.info("round %d: all local workers succeeded", rnd.generation)
                self._remove_local_tier()
                return 0
            if outcome.kind == "stopped":
                return 128 + (self._stop_signal or signal.SIGTERM)
            end = outcome.end
            assert end is not None
            if end.reason == "failure":
                used = await self._ledger.count_failure(client, rnd)
                if used > self.opts.max_restarts:
                    await self._leave(client)
                    raise UserError(
                        f"job {self.opts.job} failed: {used} failed rounds, more than "
                        f"--max-restarts {self.opts.max_restarts} allows; last failure: "
                        f"{end.detail or 'unknown'}",
                        exit_code=1,
                    )
                log.info(
                    "round %d failed (%s); restarting (%d of %d restarts used)",
                    end.generation,
                    end.detail or "no detail",
                    used,
                    self.opts.max_restarts,
                )
            else:
                log.info(
                    "round %d ended: %s%s; re-forming",
                    end.generation,
                    end.reason,
                    f" ({end.detail})" if end.detail else "",
                )

    async def _join(
        self, client: RendezvousClient, addr: str, port: int, endpoint: str
    ) -> Round | None:
        """Join the next round; None if the agent was told to stop while waiting."""
        assert self._stop is not None
        opts = self.opts
        join = asyncio.ensure_future(
            client.join(
                nproc=opts.nproc,
                addr=addr,
                port=port,
                min_nodes=opts.min_nodes,
                max_nodes=opts.max_nodes,
                timeout=opts.tuning.join_timeout_s,
            )
        )
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({join, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not join.done():
            join.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await join
            return None
        try:
            return join.result()
        except TimeoutError as exc:
            raise UserError(
                f"no round formed in {opts.tuning.join_timeout_s:.0f} s: fewer than "
                f"{opts.min_nodes} node(s) joined job {opts.job} at {endpoint} (start the other "
                "agents, lower --nnodes MIN, or raise --rdzv-conf join_timeout)",
                exit_code=1,
            ) from exc

    async def _run_round(
        self, client: RendezvousClient, rnd: Round, reservation: PortReservation, restarts: int
    ) -> Outcome:
        opts = self.opts
        gen = rnd.generation
        me = rnd.member(opts.node_id)
        master_addr, master_port = rnd.master_addr, rnd.master_port
        if opts.standalone and opts.master_port is not None:
            master_addr, master_port = opts.master_addr or master_addr, opts.master_port
        assert self._run_dir is not None
        control = self._run_dir / f"round-{gen}.control"
        control.touch()
        self._control = control
        place = RoundPlacement(
            generation=gen,
            group_rank=me.rank,
            group_world_size=len(rnd.members),
            rank_offset=rnd.rank_offset(opts.node_id),
            world_size=rnd.world_size,
            master_addr=master_addr,
            master_port=master_port,
            restart_count=restarts,
            control_file=str(control),
        )
        end_task = asyncio.ensure_future(self._watch_end(client, gen))
        reservation.release()
        try:
            self._workers = await self._launch(place)
            log.info(
                ROUND_FORMAT,
                gen,
                place.rank_offset,
                place.rank_offset + opts.nproc - 1,
                place.world_size,
                place.group_world_size,
                master_addr,
                master_port,
                ",".join(str(w.pid) for w in self._workers),
            )
            return await self._supervise(client, gen, control, end_task)
        finally:
            end_task.cancel()
            if any(w.returncode is None for w in self._workers):
                await self._stop_workers(None)
            self._workers = []
            for path in (control, *control.parent.glob(f"{control.name}.saving-*")):
                with contextlib.suppress(OSError):
                    path.unlink()

    async def _launch(self, place: RoundPlacement) -> list[Worker]:
        log_dir = None
        if self.opts.log_dir:
            log_dir = (
                Path(self.opts.log_dir)
                / self.opts.job
                / self.opts.node_id
                / f"round{place.generation}"
            )
        workers: list[Worker] = []
        for local_rank, base in enumerate(self._node_envs):
            env = round_env(base, place)
            rank = place.rank_offset + local_rank

            def assign(w: Worker, rank: int = rank) -> None:
                w.assign(rank, log_dir)

            worker = None
            if self._pool is not None:
                worker = await self._pool.take(local_rank, env, assign)
            if worker is None:
                worker = await start_worker(self.program, env, local_rank, self._sinks(local_rank))
                assign(worker)
            workers.append(worker)
        if self._pool is not None:
            self._pool.fill_later(STANDBY_DELAY_S)
        return workers

    async def _supervise(
        self, client: RendezvousClient, gen: int, control: Path, end_task: asyncio.Future[RoundEnd]
    ) -> Outcome:
        assert self._stop is not None
        exits = {asyncio.ensure_future(w.wait()): w for w in self._workers}
        stop = asyncio.ensure_future(self._stop.wait())
        parked_until: float | None = None  # workers stopped at a safe point on their own
        try:
            while True:
                timeout = (
                    None if parked_until is None else max(0.0, parked_until - time.monotonic())
                )
                done, _ = await asyncio.wait(
                    {*exits, end_task, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if stop in done:
                    await self._stop_for_signal(client, control)
                    return Outcome("stopped")
                failed: str | None = None
                for task in done & exits.keys():
                    worker = exits.pop(task)
                    code = task.result()
                    if code == SAFEPOINT_EXIT:
                        parked_until = parked_until or (
                            time.monotonic() + self.opts.tuning.safepoint_timeout_s
                        )
                    elif code != 0 and failed is None:
                        failed = (
                            f"rank {worker.rank} (node {self.opts.node_id}, local rank "
                            f"{worker.local_rank}) {describe_exit(code)}"
                        ) + (await _last_words(worker) if code > 0 else "")
                if end_task in done:
                    if failed is not None:  # ours failed too, but the round already ended
                        log.info("round %d: %s", gen, failed)
                    end = end_task.result()
                    safe = control if end.graceful and self._bootstrap is not None else None
                    await self._stop_workers(safe)
                    return Outcome("ended", end)
                if failed is not None:
                    return await self._fail(client, gen, failed, end_task)
                if not done:
                    detail = (
                        f"workers on node {self.opts.node_id} stopped at a safe point but the "
                        "round did not end"
                    )
                    return await self._fail(client, gen, detail, end_task)
                if not exits and parked_until is None:
                    with contextlib.suppress(Exception):
                        await client.report_succeeded(gen)
                    return Outcome("succeeded")
        finally:
            stop.cancel()
            for task in exits:
                task.cancel()

    async def _fail(
        self, client: RendezvousClient, gen: int, detail: str, end_task: asyncio.Future[RoundEnd]
    ) -> Outcome:
        """A local worker failed: tell the service (it ends the round for all), stop the rest."""
        log.info("round %d: %s", gen, detail)
        report = asyncio.ensure_future(client.report_failure(gen, detail))
        await self._stop_workers(None)
        try:
            await report
        except Exception as exc:  # the service may be restarting; the round end still comes
            log.warning("could not report the failure to the rendezvous service: %s", exc)
        try:
            end = await asyncio.wait_for(asyncio.shield(end_task), END_AFTER_REPORT_S)
        except TimeoutError:
            from lattice.rendezvous.client import RoundEnd

            end = RoundEnd(generation=gen, reason="failure", detail=detail, graceful=False)
        if end.reason == "failure" and not end.detail:
            end = type(end)(end.generation, end.reason, detail, end.graceful)
        return Outcome("ended", end)

    async def _stop_for_signal(self, client: RendezvousClient, control: Path) -> None:
        """Graceful stop of this node: safe point first if the addon runs, then leave.

        Without the addon, leave first: the others then re-form on a pushed round end instead
        of discovering our workers' absence as a failure.
        """
        if self._bootstrap is not None:
            await self._stop_workers(control)
            await self._leave(client)
        else:
            await self._leave(client)
            await self._stop_workers(None)

    async def _stop_workers(self, control: Path | None) -> None:
        tuning = self.opts.tuning
        await stop_workers(
            self._workers,
            control_file=control,
            safepoint_timeout=tuning.safepoint_timeout_s,
            kill_grace=tuning.kill_grace_s,
            saving=self._control if self._bootstrap is not None else None,
            save_grace=tuning.save_grace_s,
        )

    async def _watch_end(self, client: RendezvousClient, gen: int) -> RoundEnd:
        """The pushed end of round ``gen``; an unreachable service does not stop training."""
        from lattice.rendezvous.errors import RendezvousError, RendezvousUnreachable

        warned = False
        while True:
            try:
                return await client.wait_round_end(gen)
            except (RendezvousUnreachable, RendezvousError) as exc:
                if not warned:
                    log.warning("rendezvous service: %s; training continues", exc)
                    warned = True
                await asyncio.sleep(1.0)

    # ---------------------------------------------------------------- helpers and cleanup

    def _local_address(self, endpoint: str) -> str:
        """The address peers use to reach this node's rank-0 store (MASTER_ADDR)."""
        if self.opts.local_addr:
            return self.opts.local_addr
        if self.opts.standalone:
            return self.opts.master_addr or "127.0.0.1"
        host, _, port = endpoint.rpartition(":")
        host = host.strip("[]")
        try:
            for family, _, _, _, sockaddr in socket.getaddrinfo(
                host, int(port), type=socket.SOCK_DGRAM
            ):
                with socket.socket(family, socket.SOCK_DGRAM) as probe:
                    probe.connect(sockaddr)  # no packet is sent; picks the outgoing interface
                    return str(probe.getsockname()[0])
        except OSError:
            pass
        return socket.getfqdn()

    async def _leave(self, client: RendezvousClient) -> None:
        try:
            await asyncio.wait_for(client.leave(), self.opts.tuning.request_timeout_s)
        except Exception as exc:
            log.debug("leave failed: %s", exc)

    def _remove_local_tier(self) -> None:
        node_dir = local_ckpt_dir(self.opts.job, self.opts.node_id)
        shutil.rmtree(node_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # the job's dir, once its last node has gone
            node_dir.parent.rmdir()

    async def _shutdown(
        self, client: RendezvousClient | None, embedded: EmbeddedRendezvous | None
    ) -> None:
        if self._workers:
            await self._stop_workers(None)
        if self._pool is not None:
            await self._pool.close()
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
        if embedded is not None:
            embedded.stop()
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
        drain_all()


async def _last_words(worker: Worker) -> str:
    """``: <last stderr line>`` of a failed worker (its output read to the end, bounded)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1.0):
            await asyncio.gather(*worker.pumps, return_exceptions=True)
    text = worker.last_error.text
    return f": {text}" if text else ""
