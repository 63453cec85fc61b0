"""Hugging Face Accelerate's prepared DataLoader (``DataLoaderShard``) under the addon.

``accelerator.prepare(loader)`` returns a ``DataLoaderShard``: not a ``DataLoader`` subclass but
an adapter around one, iterated one batch ahead (to know which batch is the last). Counted at
its inner ``DataLoader``, the data position was one batch past what the loop had taken, and a
restored run skipped that batch. So the shard's passes are the ones tracked (`Runtime.loader_iter`
with a ``counter``), its inner ``DataLoader``'s are not (`data.INNER`), and:

- the sampler skip is armed on the inner loader's sampler (reached through the shard, which
  hands attribute reads to it);
- the RNG is restored after the inner loader yielded the resumed pass's first batch, before it
  fetches the next (`Runtime.inner_pass`): the inner iterator is created, and draws its seed,
  only once the shard runs, and the uninterrupted run had fetched that first batch before the
  checkpoint;
- the shard's pass counter (``iteration``, which it gives ``set_epoch``) is saved with the
  position and set back when the checkpoint's pass starts: the passes fast-forwarded before it
  do not run the shard, so they do not count themselves.

``DataLoaderDispatcher`` (``dispatch_batches``, accelerate's default for an IterableDataset:
rank 0 reads num_processes batches a step, one step ahead, and sends each rank its slice) is
tracked the same way, on every rank: tracked at its inner ``DataLoader``, which only rank 0
iterates, rank 0 had its step boundary at the fetch and the others at the optimizer step, and
their collectives crossed: the job hung. Its pass cannot be resumed part-way (the inner
position runs a step and num_processes batches ahead of the loop's): it starts over, logged.

Trainer uses the same shards; inside ``Trainer.train()`` all of this is off (hf.py).
"""

from __future__ import annotations

import functools
from typing import Any

from lattice.addon import data, imports, patches

MODULE = "accelerate.data_loader"
COUNTER = "iteration"  # DataLoaderShard's finished passes, its set_epoch argument


def patch(rt: Any, module: Any) -> None:
    """Wrap ``__iter__`` of ``DataLoaderShard`` and ``DataLoaderDispatcher`` (idempotent)."""
    _wrap(rt, module.DataLoaderShard)
    dispatcher = getattr(module, "DataLoaderDispatcher", None)
    if dispatcher is not None:
        setattr(dispatcher, data.DISPATCHED, True)
        _wrap(rt, dispatcher)


def _wrap(rt: Any, adapter: type) -> None:
    def iterate(self: Any, original: Any) -> Any:
        def counted(self: Any) -> Any:
            start = getattr(self, COUNTER, None)
            yield from original(self)
            if start is not None and getattr(self, COUNTER, None) == start:
                setattr(self, COUNTER, start + 1)  # an empty pass (resumed at its end) counts

        self.base_dataloader.__dict__[data.INNER] = True
        return rt.loader_iter(self, counted, counter=COUNTER)

    patches.wrap_iter(adapter, iterate)


def install(rt: Any) -> None:
    """Patch the shard now if ``accelerate.data_loader`` is imported, else when it is."""
    imports.when_imported(MODULE, "DataLoaderShard", functools.partial(patch, rt), rt.say)
