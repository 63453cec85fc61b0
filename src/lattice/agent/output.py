"""Worker output: every line of a worker's stdout/stderr is prefixed with its global rank.

Like torchrun's log prefixing (``[rank3]: ...``). Lines are copied as bytes (no decoding), long
lines are split at 64 KiB rather than buffered without bound, and a partial last line is
flushed when the worker exits. With ``--log-dir`` each worker's output is also written to a file.

Writes to the agent's own stdout/stderr happen on one daemon thread per stream: if whoever
reads the agent's output stalls, the workers wait on their pipes, but the agent's event loop
(and with it the heartbeats that keep this node in the job) never blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from pathlib import Path
from typing import BinaryIO

CHUNK = 65536
QUEUE_DEPTH = 256


class Label:
    """A mutable prefix: a standby interpreter learns its rank only when a round starts."""

    def __init__(self, text: str) -> None:
        self.prefix = b""
        self.set(text)

    def set(self, text: str) -> None:
        self.prefix = f"[{text}]: ".encode()


class StreamWriter:
    """Writes to one stream from a daemon thread, so a stalled reader never blocks the caller."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream: BinaryIO | None = stream
        self._queue: queue.Queue[bytes] = queue.Queue(QUEUE_DEPTH)
        self._thread = threading.Thread(target=self._run, name="lattice-output", daemon=True)
        self._thread.start()

    async def write(self, data: bytes) -> None:
        while True:
            try:
                self._queue.put_nowait(data)
                return
            except queue.Full:  # the reader of our output is behind: make the worker wait
                await asyncio.sleep(0.01)

    def _run(self) -> None:
        while True:
            data = self._queue.get()
            try:
                if self._stream is not None:
                    self._stream.write(data)
                    self._stream.flush()
            except (BrokenPipeError, ValueError, OSError):  # our own output went away
                self._stream = None
            finally:
                self._queue.task_done()

    def drain(self, timeout: float) -> None:
        """Wait (bounded) until everything queued has been written."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)


_writers: dict[int, StreamWriter] = {}


def writer_for(stream: BinaryIO) -> StreamWriter:
    """The process-wide writer of ``stream`` (one thread per stream keeps lines in order)."""
    key = id(stream)
    if key not in _writers:
        _writers[key] = StreamWriter(stream)
    return _writers[key]


def drain_all(timeout: float = 2.0) -> None:
    for w in list(_writers.values()):
        w.drain(timeout)


class Sink:
    """Where one worker stream goes: the agent's stream (unless filtered) and a log file."""

    def __init__(self, stream: BinaryIO | None, log_path: Path | None = None) -> None:
        self.out = writer_for(stream) if stream is not None else None
        self.log: BinaryIO | None = None
        self.set_log(log_path)

    def set_log(self, log_path: Path | None) -> None:
        self.close()
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log = log_path.open("ab")

    async def write(self, data: bytes) -> None:
        if self.out is not None:
            await self.out.write(data)
        if self.log is not None:
            with contextlib.suppress(OSError):
                self.log.write(data)
                self.log.flush()

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


class LastLine:
    """The last non-empty line a stream carried (a failed worker's error, for its report)."""

    LIMIT = 300

    def __init__(self) -> None:
        self.text = ""

    def see(self, lines: list[bytes]) -> None:
        for line in reversed(lines):
            if line.strip():
                self.text = line.strip()[-self.LIMIT :].decode(errors="replace")
                return


async def pump(
    reader: asyncio.StreamReader, label: Label, sink: Sink, last: LastLine | None = None
) -> None:
    """Copy ``reader`` to ``sink`` line by line with ``label``'s prefix until EOF."""
    pending = b""
    try:
        while True:
            chunk = await reader.read(CHUNK)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if lines:
                await sink.write(b"".join(label.prefix + line + b"\n" for line in lines))
                if last is not None:
                    last.see(lines)
            if len(pending) >= CHUNK:
                await sink.write(label.prefix + pending + b"\n")
                pending = b""
        if pending:
            await sink.write(label.prefix + pending + b"\n")
            if last is not None:
                last.see([pending])
    finally:
        sink.close()
