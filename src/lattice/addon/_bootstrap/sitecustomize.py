"""Activates the Lattice addon in a training process, then chains to any other sitecustomize.

Nothing heavy happens here: a `sys.meta_path` hook waits for the script to import `torch` and
only then patches it, so processes that never import torch pay nothing.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)


class _TorchImportHook(importlib.abc.MetaPathFinder):
    """Runs the addon's activation right after the ``torch`` module finishes executing."""

    def find_spec(self, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
        if fullname != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.loader is None:
            return spec
        original = spec.loader.exec_module

        def exec_module(module):  # type: ignore[no-untyped-def]
            original(module)
            try:
                from lattice.addon import runtime

                runtime.activate()
            except Exception as exc:  # the training must go on even if the addon cannot
                print(f"lattice addon: not activated: {exc!r}", file=sys.stderr, flush=True)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _install() -> None:
    job = os.environ.get("LATTICE_JOB")
    setting = os.environ.get("LATTICE_AUTOPATCH", "torch,transformers").strip().lower()
    if not job or "torch" not in {p.strip() for p in setting.split(",")}:
        return
    try:
        import lattice.addon  # noqa: F401
    except ImportError:
        sys.path.append(str(Path(_HERE).parents[2]))  # src/ of a source checkout
    if "torch" in sys.modules:
        from lattice.addon import runtime

        runtime.activate()
    else:
        sys.meta_path.insert(0, _TorchImportHook())


def _chain() -> None:
    """Import the next ``sitecustomize`` on sys.path (the one ours shadows), if any."""
    me = sys.modules.pop("sitecustomize", None)
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    try:
        importlib.import_module("sitecustomize")
    except ImportError:
        pass
    finally:
        sys.path[:] = saved
        if me is not None:
            sys.modules["sitecustomize"] = me


_install()
_chain()
