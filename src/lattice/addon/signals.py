"""How a training process ends on SIGTERM or an uncaught exception: its last step saved first.

The agent stops a failed round's survivors with SIGTERM; a peer's death raises inside a
collective. Both save the last finished step (`Runtime.save_failed_step`) before the process
dies as it would have without the addon.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from lattice.addon.protocol import saving_marker, say

if TYPE_CHECKING:
    from lattice.addon.runtime import Runtime

TERM_HANDLER_WAIT_S = 1.0  # for the main thread to take a SIGTERM (`term_watchdog`); a
# loaded machine may not run it sooner, and the agent waits 3 s before its SIGKILL anyway
TERM_WRITE_WAIT_S = 60.0  # at SIGTERM, for snapshots being written (the agent's save grace)
SAVING = threading.Event()  # set while this process saves on its way out (`saving`)


def hold_sigterm() -> None:
    """Ignore SIGTERM for the rest of this process: it is writing its safe point, then exits.

    When one node leaves after a safe point the round ends for the others too, and their
    agents SIGTERM workers that may still be writing that same checkpoint (the agent's SIGKILL
    after its grace, or its save grace while `saving`, still bounds the wait).
    """
    with contextlib.suppress(ValueError):  # not the main thread: the default action stays
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def saving(rt: Runtime) -> Iterator[None]:
    """Tell the agent this process is saving (`saving_marker`): its SIGKILL waits, up to its
    save grace; and `term_watchdog` that a SIGTERM's handler may wait. Only around local
    writes, which no dead peer can hang."""
    marker = saving_marker(rt.control, os.getpid()) if rt.control else None
    if marker is not None:
        with contextlib.suppress(OSError):
            marker.touch()
    SAVING.set()
    try:
        yield
    finally:
        SAVING.clear()
        if marker is not None:
            with contextlib.suppress(OSError):
                marker.unlink(missing_ok=True)


@contextlib.contextmanager
def sigterm_recorded(rt: Runtime) -> Any:
    """SIGTERM waits until the block is done (`Runtime.term_pending` says it came)."""
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: setattr(rt, "term_pending", True))
    except ValueError:  # not the main thread: nothing to hold
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def on_uncaught(rt: Runtime) -> None:
    """An exception ends the script (a peer died inside a collective): save the last step."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        rt.ending = True
        rt.save_after_failure()
        # A SIGTERM that came meanwhile ends the exit that follows (atexit, DDP and gloo
        # teardown: about a second) at once, as it would have without the save.
        previous(kind, exc, tb)
        if rt.term_pending:
            die_of_sigterm(rt)

    sys.excepthook = hook


def on_sigterm(rt: Runtime) -> None:
    """The agent stops the survivors of a failed round with SIGTERM, often before their own
    collective fails (a peer died while they computed): save the last step, then die of it.

    Left alone where the script or its launcher chose what SIGTERM does.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    started = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        started.set()
        if os.getpid() == rt.pid:
            hold_sigterm()
            # A DataLoader's worker dying of the same SIGTERM must not raise in here.
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            if rt.defer_to_boundary():
                return  # the step goes on to its boundary, which is saved, then this dies
            try:
                rt.save_failed_step()
            except Exception as err:
                say(f"saving the last finished step at SIGTERM failed: {err!r}")
        die_of_sigterm(rt)

    signal.signal(signal.SIGTERM, handler)
    term_watchdog(started)


def flush_output() -> None:
    """Flush stdout and stderr before the process ends without returning.

    torch.distributed's excepthook wraps ours and points ``sys.stderr`` at a buffer while ours
    runs (to prefix the rank to the traceback), writing it out when ours returns; ours may not
    return (`die_of_sigterm`), and the failed-step save's line and the traceback were lost.
    """
    sys.stdout.flush()
    captured = sys.stderr
    real = sys.__stderr__
    if real is not None and captured is not real and hasattr(captured, "getvalue"):
        with contextlib.suppress(Exception):
            real.write(captured.getvalue())
            captured.seek(0)
            captured.truncate()
        real.flush()
    else:
        captured.flush()


def die_of_sigterm(rt: Runtime) -> None:
    """End as SIGTERM's default action would have, once the snapshots being written are."""
    if os.getpid() == rt.pid:
        with rt._written:  # this step's own snapshot, or an older one
            if rt.writing:
                with saving(rt):
                    rt._written.wait_for(lambda: not rt.writing, timeout=TERM_WRITE_WAIT_S)
    flush_output()
    with contextlib.suppress(ValueError):  # not the main thread: exit as the shell reports it
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    os._exit(128 + signal.SIGTERM)


def term_watchdog(started: threading.Event) -> None:
    """A Python signal handler runs only when the main thread is back in Python: one blocked
    in a collective whose peer vanished without a reset would hold the handler (and the round's
    restart) until the agent's SIGKILL. This thread sees the signal arrive (the wakeup fd) and
    ends the process as SIGTERM's default would have, unless the handler started meanwhile or
    the process is `saving` (then the main thread is in Python and ends it after the save: a
    failed-step save from the excepthook holds SIGTERM, and a multi-second save was cut at
    `TERM_HANDLER_WAIT_S`)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except ValueError:
        os.close(read_fd)
        os.close(write_fd)
        return

    def in_child() -> None:  # a forked DataLoader worker's signals are not this process's
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)

    os.register_at_fork(after_in_child=in_child)

    def watch() -> None:
        while True:
            try:
                got = os.read(read_fd, 64)
            except OSError:
                return
            if signal.SIGTERM not in got:
                continue
            while not started.wait(TERM_HANDLER_WAIT_S):
                if not SAVING.is_set():
                    flush_output()
                    os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="lattice-sigterm", daemon=True).start()
