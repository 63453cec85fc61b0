"""The standby interpreter: imports torch ahead of time, then becomes a worker on request.

Started by the agent as ``python -u .../_standby.py READY_FD IDLE MODULE...`` with the worker's
fixed environment (minus the addon bootstrap). It imports the listed modules (at idle priority
if IDLE is 1), says so by writing to READY_FD (then closed: the worker inherits no extra
descriptor), then blocks on one JSON
line on stdin: ``{"env", "argv", "orig_argv", "cwd", "mode", "target", "path0", "bootstrap"}``.
It then makes itself look like the fresh process the agent would have started — same
``os.environ``, ``sys.argv``, cwd, ``sys.path``, stdin on /dev/null, the addon's
``sitecustomize`` run with the round's environment — and runs the script as ``__main__``.
EOF on stdin (the agent no longer needs it) exits quietly.
"""

import json
import os
import runpy
import site
import sys


def _background_priority() -> bool:
    """Import at SCHED_IDLE so a standby never slows training, if we can come back from it.

    Leaving SCHED_IDLE needs CAP_SYS_NICE or RLIMIT_NICE; the test runs on a throwaway thread
    (the policy is per thread) so the main thread never gets stuck at idle priority.
    """
    import threading

    ok = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            ok.append(True)
        except (OSError, AttributeError):
            pass

    thread = threading.Thread(target=probe, name="lattice-standby-probe")
    thread.start()
    thread.join()
    if ok:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    return bool(ok)


def _prewarm(modules: list[str]) -> None:
    for name in modules:
        try:  # noqa: SIM105 - no contextlib: the worker's modules stay as a fresh one's
            __import__(name)
        except ImportError:
            pass  # not installed: the worker would fail the same way when it imports it


def _become(msg: dict) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.chdir(msg["cwd"])
    env = dict(msg["env"])
    if "LC_CTYPE" in os.environ and "LC_CTYPE" not in env:
        # Python's locale coercion (PEP 538) added it at startup; a fresh worker gets it too.
        env["LC_CTYPE"] = os.environ["LC_CTYPE"]
    os.environ.clear()
    os.environ.update(env)
    sys.argv = list(msg["argv"])
    sys.orig_argv = list(msg["orig_argv"])
    first = [] if sys.flags.safe_path else [msg["path0"]]  # the script's dir (or cwd for -m)
    bootstrap = msg.get("bootstrap")
    sys.path[:] = [*first, *([bootstrap] if bootstrap else []), *sys.path]
    if bootstrap:
        sys.modules.pop("sitecustomize", None)
        site.execsitecustomize()


def _run_script(path: str) -> None:
    """Run ``path`` in a new ``__main__`` module, as ``python path`` does (runpy differs in
    ``sys.argv[0]``); a traceback shows the script's frames only."""
    if not os.path.isfile(path):  # a directory or zip with __main__.py: runpy knows those
        runpy.run_path(path, run_name="__main__")
        return
    import builtins
    import importlib.machinery
    import types

    main = types.ModuleType("__main__")
    main.__file__ = path
    main.__cached__ = None
    main.__builtins__ = builtins
    main.__loader__ = importlib.machinery.SourceFileLoader("__main__", path)
    main.__annotations__ = {}
    sys.modules["__main__"] = main
    with open(path, "rb") as f:
        code = compile(f.read(), path, "exec", dont_inherit=True)
    try:
        exec(code, main.__dict__)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        sys.excepthook(type(exc), exc.with_traceback(tb), tb)
        sys.exit(1)


def _say_ready(fd: int) -> None:
    try:  # noqa: SIM105 - no contextlib: the worker's modules stay as a fresh one's
        os.write(fd, b"r")
    except OSError:
        pass  # the agent stopped listening
    os.close(fd)


def main() -> None:
    if not sys.flags.safe_path:
        del sys.path[0]  # this file's directory: it must not shadow what the worker imports
    ready_fd, want_idle, modules = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3:]
    idle = _background_priority() if want_idle else False
    import threading

    main_thread = threading.get_native_id()
    message: list[bytes] = []

    def read() -> None:
        # Read while the imports run: a standby taken before it is warm finishes them at
        # normal priority instead of idle.
        message.append(sys.stdin.buffer.readline())
        if idle and message[0].strip():
            os.sched_setscheduler(main_thread, os.SCHED_OTHER, os.sched_param(0))

    reader = threading.Thread(target=read, name="lattice-standby", daemon=True)
    reader.start()
    _prewarm(modules)
    _say_ready(ready_fd)
    reader.join()
    line = message[0]
    if not line.strip():
        os._exit(0)
    msg = json.loads(line)
    _become(msg)
    if msg["mode"] == "module":
        runpy._run_module_as_main(msg["target"], alter_argv=True)  # what `python -m` does
    else:
        _run_script(os.path.abspath(msg["target"]))


if __name__ == "__main__":
    main()
