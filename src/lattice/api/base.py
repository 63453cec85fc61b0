"""Base models: camelCase on the wire, snake_case in Python.

`ClosedModel` rejects unknown fields (a typo in ``spec`` is an error that names it);
`OpenModel` keeps them (Kubernetes pod templates have far more fields than we model, and
every one of them must reach the pod unchanged).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class ClosedModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_assignment=True
    )

    def to_dict(self) -> dict[str, Any]:
        """The wire form: camelCase keys, only what was set or differs from nothing."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class OpenModel(ClosedModel):
    model_config = ConfigDict(extra="allow")
