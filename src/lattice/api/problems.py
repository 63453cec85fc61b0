"""Validation problems that name the field and the fix, turned into one-line `UserError`s.

Validators raise `SpecProblem` (a `ValueError`, so pydantic collects it with its location);
`format_validation_error` renders pydantic's errors as ``spec.minSize: … (fix: …)``.
"""

from __future__ import annotations

import reprlib
from typing import Any

from pydantic import ValidationError

MAX_PROBLEMS = 10  # problems named in one message; the rest are counted
MAX_LINE = 300  # characters of one problem (or name) in a message; the middle is cut
_SHOW = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict = 2, 4, 4
_SHOW.maxstring = _SHOW.maxother = _SHOW.maxlong = 80


class SpecProblem(ValueError):
    """A field's value is wrong: what is wrong, how to fix it, and (optionally) which sub-field.

    ``field`` is relative to the location pydantic reports (used by model-level validators,
    whose location is the model itself).
    """

    def __init__(self, problem: str, fix: str, field: str = "") -> None:
        super().__init__(f"{problem} (fix: {fix})")
        self.problem = problem
        self.fix = fix
        self.field = field


# pydantic error type → (wording, fix) for errors our validators do not raise themselves.
_BUILTIN: dict[str, tuple[str, str]] = {
    "missing": ("is required", "add it"),
    "extra_forbidden": ("is not a known field", "remove it or check its spelling"),
    "int_parsing": ("must be a whole number", "write a number such as 2"),
    "int_type": ("must be a whole number", "write a number such as 2"),
    "int_from_float": ("must be a whole number", "drop the fraction"),
    "bool_parsing": ("must be true or false", "write true or false"),
    "bool_type": ("must be true or false", "write true or false"),
    "string_type": ("must be a string", "quote the value"),
    "list_type": ("must be a list", "write it as a YAML list"),
    "dict_type": ("must be a mapping", "write it as key: value pairs"),
    "model_type": ("must be a mapping", "write it as key: value pairs"),
    "model_attributes_type": ("must be a mapping", "write it as key: value pairs"),
    "float_parsing": ("must be a number", "write a number such as 30"),
    "float_type": ("must be a number", "write a number such as 30"),
}


def shown_value(value: Any) -> str:
    """A short repr of what the user wrote (an alias bomb must not become a gigabyte message)."""
    return _SHOW.repr(value)


def one_line(text: str, limit: int = MAX_LINE) -> str:
    """``text`` escaped to one printable line of at most ``limit`` characters (start and end
    kept: a field name or value the user wrote may be megabytes long or hold line breaks)."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    if len(text) > limit:
        keep = (limit - 1) // 2
        text = f"{text[:keep]}…{text[-keep:]}"
    return text


def location(loc: tuple[int | str, ...]) -> str:
    """pydantic's ``('spec', 'containers', 0, 'command')`` → ``spec.containers[0].command``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith("function-") or "[" in part:
            continue  # pydantic's names for validator and union branches, not user fields
        else:
            out += f".{part}" if out else part
    return out


def _describe(err: Any) -> tuple[str, str]:
    ctx = err.get("ctx") or {}
    cause = ctx.get("error")
    path = location(tuple(err["loc"]))
    if isinstance(cause, SpecProblem):
        if cause.field:
            path = f"{path}.{cause.field}" if path else cause.field
        return path, f"{cause.problem} (fix: {cause.fix})"
    kind = err["type"]
    if kind in _BUILTIN:
        wording, fix = _BUILTIN[kind]
        got = err.get("input")
        shown = "" if kind in ("missing", "extra_forbidden") else f" (got {shown_value(got)})"
        return path, f"{wording}{shown} (fix: {fix})"
    bounds = {"greater_than_equal": ("ge", "at least"), "greater_than": ("gt", "more than")}
    if kind in bounds:
        key, words = bounds[kind]
        limit = ctx.get(key)
        return path, f"{shown_value(err['input'])} is too small (fix: use a value {words} {limit})"
    if kind == "literal_error":
        expected = ctx.get("expected", "")
        return path, f"{shown_value(err['input'])} is not allowed (fix: use one of {expected})"
    return path, f"{err['msg']} (fix: correct this field)"


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """All of a ValidationError's problems on one line, each as ``field: problem (fix: …)``."""
    seen: list[str] = []
    for err in exc.errors():
        path, text = _describe(err)
        line = one_line(f"{path}: {text}" if path else text)
        if line not in seen:
            seen.append(line)
    more = len(seen) - MAX_PROBLEMS
    tail = f"; and {more} more problems" if more > 0 else ""
    return prefix + "; ".join(seen[:MAX_PROBLEMS]) + tail
