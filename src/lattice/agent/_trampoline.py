"""Runs between the agent's fork and the worker's exec: ties the worker's life to the agent.

Started as ``python -S -I _trampoline.py AGENT_PID CMD...``. It asks the kernel to SIGKILL this
process when the agent dies (PR_SET_PDEATHSIG survives exec), checks the agent did not die
before that took effect, then execs the worker. Done here rather than in a ``preexec_fn``
because the agent has threads, and Python code between fork and exec is unsafe with threads.
Standard library only: it runs without site-packages.
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    agent_pid = int(sys.argv[1])
    cmd = sys.argv[2:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        print(f"lattice: cannot set PR_SET_PDEATHSIG: {os.strerror(err)}", file=sys.stderr)
        os._exit(70)
    if os.getppid() != agent_pid:  # the agent died before the death signal was armed
        os._exit(70)
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        print(f"lattice: cannot start {cmd[0]!r}: {exc.strerror}", file=sys.stderr)
        os._exit(127)


if __name__ == "__main__":
    main()
