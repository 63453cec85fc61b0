"""torchdata's ``StatefulDataLoader``: a DataLoader that defines its own ``__iter__`` (the
addon's ``DataLoader.__iter__`` never runs for it, so its passes went untracked and a restore
replayed them from their start) and saves its own position (`data.stateful_loader`).

Its ``__iter__`` is wrapped like ``DataLoader.__iter__`` once its module is imported.
"""

from __future__ import annotations

import functools
from typing import Any

from lattice.addon import imports, patches

MODULE = "torchdata.stateful_dataloader.stateful_dataloader"


def patch(rt: Any, module: Any) -> None:
    patches.wrap_iter(module.StatefulDataLoader, rt.loader_iter)


def install(rt: Any) -> None:
    """Patch it now if its module is imported, else when it is."""
    imports.when_imported(MODULE, "StatefulDataLoader", functools.partial(patch, rt), rt.say)
