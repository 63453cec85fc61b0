"""Worker output is prefixed per line with the worker's rank, without loss."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

from lattice.agent.output import CHUNK, Label, Sink, pump


async def test_lines_are_prefixed_split_and_flushed(tmp_path: Path) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"hello\nwor")
    reader.feed_data(b"ld\n" + b"x" * (CHUNK + 10) + b"\nlast-no-newline")
    reader.feed_eof()
    out = io.BytesIO()
    label = Label("local0")
    label.set("rank3")
    log = tmp_path / "r" / "stdout.log"
    sink = Sink(out, log)
    await pump(reader, label, sink)
    lines = out.getvalue().split(b"\n")
    assert lines[0] == b"[rank3]: hello"
    assert lines[1] == b"[rank3]: world"
    assert all(line.startswith(b"[rank3]: ") for line in lines[2:-1])
    assert b"".join(line[len(b"[rank3]: ") :] for line in lines[2:-2]) == b"x" * (CHUNK + 10)
    assert lines[-2] == b"[rank3]: last-no-newline"
    assert log.read_bytes() == out.getvalue()
