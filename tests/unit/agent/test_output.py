"""Worker output is prefixed per line with the worker's rank, without loss or stalls."""

from __future__ import annotations

import asyncio
import io
import os
import threading
from pathlib import Path

from lattice.agent.output import CHUNK, Label, Sink, drain_all, pump


async def test_lines_are_prefixed_split_and_flushed(tmp_path: Path) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"hello\nwor")
    reader.feed_data(b"ld\n" + b"x" * (CHUNK + 10) + b"\nlast-no-newline")
    reader.feed_eof()
    out = io.BytesIO()
    label = Label("local0")
    label.set("rank3")
    log = tmp_path / "r" / "stdout.log"
    await pump(reader, label, Sink(out, log))
    drain_all(30)
    lines = out.getvalue().split(b"\n")
    assert lines[0] == b"[rank3]: hello"
    assert lines[1] == b"[rank3]: world"
    assert all(line.startswith(b"[rank3]: ") for line in lines[2:-1])
    assert b"".join(line[len(b"[rank3]: ") :] for line in lines[2:-2]) == b"x" * (CHUNK + 10)
    assert lines[-2] == b"[rank3]: last-no-newline"
    assert log.read_bytes() == out.getvalue()


async def test_a_stalled_reader_of_our_output_does_not_block_the_event_loop() -> None:
    r, w = os.pipe()
    stream = os.fdopen(w, "wb", buffering=0)
    reader = asyncio.StreamReader()
    payload = b"".join(b"line %d\n" % i for i in range(100_000))  # far more than a pipe holds
    reader.feed_data(payload)
    reader.feed_eof()
    got = bytearray()
    reading_started = threading.Event()

    def read_all() -> None:
        reading_started.set()
        while chunk := os.read(r, 1 << 16):
            got.extend(chunk)

    # Nobody reads our output for 3 s; a blocking write would freeze the loop until then.
    timer = threading.Timer(3.0, read_all)
    timer.start()
    task = asyncio.ensure_future(pump(reader, Label("rank0"), Sink(stream)))
    for _ in range(20):
        await asyncio.sleep(0.01)
    assert not reading_started.is_set(), "the event loop was blocked by a full output pipe"
    await asyncio.wait_for(task, 60)
    drain_all(30)
    stream.close()
    timer.join(30)
    os.close(r)
    assert got.count(b"\n") == 100_000 and got.startswith(b"[rank0]: line 0\n")
