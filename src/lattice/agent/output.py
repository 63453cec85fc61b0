"""Worker output: every line of a worker's stdout/stderr is prefixed with its global rank.

Like torchrun's log prefixing (``[rank3]: ...``). Lines are copied as bytes (no decoding), long
lines are split at 64 KiB rather than buffered without bound, and a partial last line is
flushed when the worker exits. With ``--log-dir`` each worker's output is also written to a file.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import BinaryIO

CHUNK = 65536


class Label:
    """A mutable prefix: a standby interpreter learns its rank only when a round starts."""

    def __init__(self, text: str) -> None:
        self.prefix = b""
        self.set(text)

    def set(self, text: str) -> None:
        self.prefix = f"[{text}]: ".encode()


class Sink:
    """Where one worker stream goes: the agent's stream (unless filtered) and a log file."""

    def __init__(self, stream: BinaryIO | None, log_path: Path | None = None) -> None:
        self.stream = stream
        self.log: BinaryIO | None = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log = log_path.open("ab")

    def set_log(self, log_path: Path | None) -> None:
        self.close()
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log = log_path.open("ab")

    def write(self, data: bytes) -> None:
        if self.stream is not None:
            try:
                self.stream.write(data)
                self.stream.flush()
            except (BrokenPipeError, ValueError):  # our own output went away: keep running
                self.stream = None
        if self.log is not None:
            self.log.write(data)
            self.log.flush()

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


async def pump(reader: asyncio.StreamReader, label: Label, sink: Sink) -> None:
    """Copy ``reader`` to ``sink`` line by line with ``label``'s prefix until EOF."""
    pending = b""
    while True:
        chunk = await reader.read(CHUNK)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if lines:
            sink.write(b"".join(label.prefix + line + b"\n" for line in lines))
        if len(pending) >= CHUNK:
            sink.write(label.prefix + pending + b"\n")
            pending = b""
    if pending:
        sink.write(label.prefix + pending + b"\n")
    sink.close()
