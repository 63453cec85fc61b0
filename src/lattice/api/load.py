"""Reading TrainingJobs from YAML or JSON text (one or many documents) with one-line errors."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import ValidationError

from lattice.api.job import TrainingJob
from lattice.api.problems import format_validation_error
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
    label = f"trainingjob {name}" if isinstance(name, str) and name else (where or "trainingjob")
    try:
        return TrainingJob.model_validate(obj)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, prefix=f"{label}: ")) from None


def _decode(text: str) -> list[Any]:
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            pass  # YAML flow style also starts with { or [; let the YAML parser judge it
        else:
            return list(doc) if isinstance(doc, list) else [doc]
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(
            f"invalid YAML{at}: {problem} (fix: check the indentation and quoting)"
        ) from None


def load_documents(text: str) -> list[TrainingJob]:
    """Every TrainingJob in YAML/JSON ``text`` (``---``-separated, a JSON list, or a ``List``)."""
    docs: list[Any] = []
    for doc in _decode(text):
        if isinstance(doc, Mapping) and doc.get("kind") == "List" and "items" in doc:
            docs.extend(doc.get("items") or [])
        else:
            docs.append(doc)
    if not docs:
        raise UserError("no TrainingJob found in the input (fix: give a YAML or JSON document)")
    many = len(docs) > 1
    return [parse_job(d, f"document {i + 1}" if many else "document") for i, d in enumerate(docs)]
