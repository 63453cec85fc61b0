"""Reading TrainingJobs from YAML or JSON text (one or many documents) with one-line errors."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import ValidationError

from lattice.api.job import TrainingJob
from lattice.api.problems import format_validation_error, one_line
from lattice.common.errors import UserError


def parse_job(obj: Any, where: str = "") -> TrainingJob:
    """One decoded document → `TrainingJob`; `UserError` naming the field and the fix."""
    if not isinstance(obj, Mapping):
        kind = type(obj).__name__
        raise UserError(f"{where or 'document'}: expected a TrainingJob mapping, got a {kind}")
    name = (
        (obj.get("metadata") or {}).get("name")
        if isinstance(obj.get("metadata"), Mapping)
        else None
    )
    label = f"trainingjob {one_line(name, 80)}" if isinstance(name, str) and name else None
    label = label or where or "trainingjob"
    try:
        return TrainingJob.model_validate(obj)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, prefix=f"{label}: ")) from None


MAX_VALUES = 100_000  # values in one input, YAML aliases counted at every use (bombs)
MAX_DEPTH = 100  # nesting levels of one input


def _unreadable(exc: Exception) -> UserError:
    """A value the JSON/YAML reader cannot turn into data (a bad date, a 5000-digit number)."""
    detail = one_line(str(exc).split(";")[0] or type(exc).__name__)
    return UserError(
        f"invalid value in the input: {detail} (fix: quote it as a string or correct it)"
    )


def _too_deep() -> UserError:
    return UserError(
        f"the input nests deeper than {MAX_DEPTH} levels (fix: a TrainingJob needs far fewer)"
    )


def _decode(text: str) -> list[Any]:
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            pass  # YAML flow style also starts with { or [; let the YAML parser judge it
        except RecursionError:
            raise _too_deep() from None
        except ValueError as exc:
            raise _unreadable(exc) from None
        else:
            return list(doc) if isinstance(doc, list) else [doc]
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = one_line(getattr(exc, "problem", None) or str(exc).splitlines()[0])
        raise UserError(
            f"invalid YAML{at}: {problem} (fix: check the indentation and quoting)"
        ) from None
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        raise _unreadable(exc) from None


def _check_size(docs: list[Any]) -> None:
    """Refuse inputs that expand past `MAX_VALUES` values or `MAX_DEPTH` levels.

    YAML aliases let a few hundred bytes stand for billions of values (and a recursive alias
    for infinitely many); validating or storing those would exhaust time and memory.
    """
    stack: list[tuple[Any, int]] = [(d, 1) for d in docs]
    seen = 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise UserError(
                f"the input holds more than {MAX_VALUES} values (YAML aliases count at every "
                "use) (fix: split it into smaller documents or remove repeated aliases)"
            )
        if depth > MAX_DEPTH:
            raise _too_deep()
        if isinstance(node, Mapping):
            stack.extend((v, depth + 1) for item in node.items() for v in item)
        elif isinstance(node, list | tuple | set | frozenset):
            stack.extend((v, depth + 1) for v in node)


def load_documents(text: str) -> list[TrainingJob]:
    """Every TrainingJob in YAML/JSON ``text`` (``---``-separated, a JSON list, or a ``List``)."""
    decoded = _decode(text)
    _check_size(decoded)
    docs: list[Any] = []
    for doc in decoded:
        if isinstance(doc, Mapping) and doc.get("kind") == "List" and "items" in doc:
            items = doc.get("items") or []
            if not isinstance(items, list):
                raise UserError("items of a List must be a list of TrainingJobs (fix: use - item)")
            docs.extend(items)
        else:
            docs.append(doc)
    if not docs:
        raise UserError("no TrainingJob found in the input (fix: give a YAML or JSON document)")
    many = len(docs) > 1
    return [parse_job(d, f"document {i + 1}" if many else "document") for i, d in enumerate(docs)]
