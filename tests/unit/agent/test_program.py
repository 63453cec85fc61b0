"""How the agent runs the user's program: torchrun's modes, and python recognised in --no-python."""

from __future__ import annotations

import os
import sys

import pytest

from lattice.agent.workers import Program, as_python_program


def test_argv_per_mode() -> None:
    assert Program("t.py", ("a",), "script", "py").argv() == ["py", "-u", "t.py", "a"]
    assert Program("pkg.m", ("a",), "module", "py").argv() == ["py", "-u", "-m", "pkg.m", "a"]
    assert Program("./run.sh", ("a",), "exec", "py").argv() == ["./run.sh", "a"]


def test_python_command_of_this_environment_becomes_a_python_program(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exe = sys.executable
    script = as_python_program([exe, "-u", "main.py", "--lr", "1"], "/w")
    assert script == Program("main.py", ("--lr", "1"), "script", exe, "/w", ("-u",))
    assert script.argv() == [exe, "-u", "main.py", "--lr", "1"]
    module = as_python_program([exe, "-m", "pkg.train", "x"], "/w")
    assert module == Program("pkg.train", ("x",), "module", exe, "/w", ())
    # A bare "python" resolves through PATH: only this environment's interpreter counts.
    monkeypatch.setenv("PATH", os.path.dirname(exe) + os.pathsep + os.environ.get("PATH", ""))
    bare = as_python_program([os.path.basename(exe), "main.py"], "/w")
    assert bare is not None and bare.python == os.path.basename(exe)


@pytest.mark.parametrize(
    "command",
    [
        ["bash", "run.sh"],
        [sys.executable, "-O", "main.py"],  # other interpreter flags: run as given
        [sys.executable, "-c", "print(1)"],
        [sys.executable],
        ["/usr/bin/python3-not-here", "main.py"],
    ],
)
def test_other_commands_run_as_given(command: list[str]) -> None:
    assert as_python_program(command, "/w") is None
