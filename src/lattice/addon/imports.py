"""Patching a library module right after it is imported (or now, if it already is)."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from typing import Any


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``patch(module)`` right after ``fullname`` finishes executing."""

    def __init__(self, fullname: str, patch: Callable[[Any], None], say: Callable[[str], None]):
        self.fullname, self.patch, self.say = fullname, patch, say

    def find_spec(self, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
        if fullname != self.fullname:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        original = spec.loader.exec_module
        patch, say = self.patch, self.say

        def exec_module(module):  # type: ignore[no-untyped-def]
            original(module)
            try:
                patch(module)
            except Exception as exc:  # training goes on without this support
                say(f"{fullname} not patched: {exc!r}")

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def when_imported(
    fullname: str, ready: str, patch: Callable[[Any], None], say: Callable[[str], None]
) -> None:
    """``patch(module)`` now if ``fullname`` is imported (and has ``ready``), else once it is."""
    module = sys.modules.get(fullname)
    if module is not None and hasattr(module, ready):
        patch(module)
    else:
        sys.meta_path.insert(0, _AfterImport(fullname, patch, say))
