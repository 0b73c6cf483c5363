"""Training batches for importance, drawn beside the Trainer's own data order without disturbing it.

A selection inside ``Trainer.train`` needs a sample of the training set. It is drawn with its own generator through
the Trainer's dataset and collator, with every random generator involved put back afterwards, so that a run trains on
the same data (and the same collator randomness) with or without GreenTrainer, and a resumed run draws the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import copy
import functools
import inspect
import random
import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler

from . import ranks
from .engine.rng import fork_rng

__all__ = ["importance_batches"]


def importance_batches(
    dataloader: DataLoader | None, count: int, seed: int, rank: int = 0, world_size: int = 1, *, draw: int = 0
) -> Iterator[Mapping[str, Any]]:
    """``count`` training batches drawn with their own generator from the Trainer's dataset and collator.

    A separate loader leaves the Trainer's sampler, epoch counter and RNG untouched, so training sees the same data
    order with or without GreenTrainer, and a resumed run draws the same importance batches as an uninterrupted one.
    Random generators the collator keeps (masked-LM masking with a ``seed``) are put back as they were, so training
    gets the same masks too. A streamed dataset cannot be sampled: the ``draw``-th selection reads it from a batch
    further on each time (the ``draw * count``-th, the ``_STREAM_DRAWS``-th selection starting again from the first,
    so that none reads far; round the stream's end too), so selections do not all rank units on its first batches. The
    batches have the global batch size (per-device batch size x world size): with several processes, rank ``r`` gets
    the ``r``-th part of each, so that the ranks together evaluate what a single process would.
    """
    if dataloader is None:
        raise ValueError("GreenTrainerCallback needs the Trainer's train_dataloader to estimate importance.")
    dataset, collate_fn = dataloader.dataset, dataloader.collate_fn
    # accelerate's loaders know the global batch size; a data-parallel one has batch_size None
    batch_size = getattr(dataloader, "total_batch_size", None) or dataloader.batch_size or 1
    with fork_rng(), _collator_generators_kept(collate_fn):
        if isinstance(dataset, IterableDataset):
            stream = _StreamFrom(dataset, (draw % _STREAM_DRAWS) * count * batch_size)
            loader = DataLoader(stream, batch_size=batch_size, collate_fn=collate_fn)
            # every rank applies the same test, so they evaluate as many batches
            batches = [b for b in islice(loader, count) if _length(b) >= world_size]
            return iter([_rows(b, ranks.importance_shard(_length(b), rank, world_size)) for b in batches])
        generator = torch.Generator().manual_seed(seed)
        sampler = RandomSampler(dataset, num_samples=min(len(dataset), count * batch_size), generator=generator)
        indices = list(sampler)
        chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
        if world_size > 1:
            # every rank must evaluate the same number of batches: a short last one that cannot be split is dropped
            chunks = [c for c in chunks if len(c) >= world_size]
            if not chunks:
                raise ValueError(
                    f"Importance batches of {batch_size} samples cannot be shared out to {world_size} processes."
                )
            chunks = [c[ranks.importance_shard(len(c), rank, world_size)] for c in chunks]
        return iter(list(DataLoader(dataset, batch_sampler=chunks, collate_fn=collate_fn)))


# how many selections read a stream at different places before going round (reading is not free: a stream tokenizes
# as it goes, so a selection reads at most this many times its batches)
_STREAM_DRAWS = 16


class _StreamFrom(IterableDataset):
    """``stream`` from its ``start``-th example on, continuing from its beginning once it ends (for as long as it is
    read: a consumer takes what it needs); ``start`` wraps round a stream shorter than it."""

    def __init__(self, stream: IterableDataset, start: int) -> None:
        self.stream, self.start = stream, start

    def __iter__(self) -> Iterator[Any]:
        skip = self.start
        while True:
            seen = 0
            for example in self.stream:
                seen += 1
                if skip:
                    skip -= 1
                    continue
                yield example
            if seen == 0:  # an empty stream
                return
            skip %= seen  # a whole pass skipped: only what is left of ``start`` modulo the stream's length


_GENERATORS = (torch.Generator, np.random.Generator, np.random.RandomState, random.Random)


@contextmanager
def _collator_generators_kept(collate_fn: Callable) -> Iterator[None]:
    """Put back the random generators the collator keeps, as they were: their states, or ``None`` for one a seeded
    collator creates on first use."""
    saved = [(owner, name, value, _generator_state(value)) for owner, name, value in _generator_slots(collate_fn)]
    try:
        yield
    finally:
        for owner, name, generator, state in saved:
            if generator is not None:
                _set_generator_state(generator, state)
            setattr(owner, name, generator)


def _generator_slots(collate_fn: Callable, depth: int = 3) -> list[tuple[Any, str, Any]]:
    """``(owner, attribute, generator)`` for each random generator reachable from the collator through attributes,
    bound methods and partials (the Trainer's column-removing wrapper, a user's wrapper, ``collator.__call__``), a few
    levels deep; unset attributes named like a generator are listed with ``None``. Models and tensors are not searched,
    and generators whose state cannot be read (``random.SystemRandom``) are left out."""
    found: list[tuple[Any, str, Any]] = []
    seen: set[int] = set()

    def visit(obj: Any, depth: int) -> None:
        if depth < 0 or id(obj) in seen or isinstance(obj, (torch.nn.Module, torch.Tensor, type, types.ModuleType)):
            return
        seen.add(id(obj))
        if isinstance(obj, functools.partial):
            for inner in (obj.func, *obj.args, *obj.keywords.values()):
                visit(inner, depth - 1)
            return
        if inspect.ismethod(obj):
            visit(obj.__self__, depth)
            return
        for name, value in list(getattr(obj, "__dict__", {}).items()):
            if isinstance(value, _GENERATORS):
                if _generator_state(value) is not None:
                    found.append((obj, name, value))
            elif value is None and ("generator" in name or "rng" in name):
                found.append((obj, name, None))
            else:
                visit(value, depth - 1)

    visit(collate_fn, depth)
    return found


def _generator_state(generator: Any) -> Any:
    """The generator's state (None for one that has none to read)."""
    if generator is None:
        return None
    if isinstance(generator, torch.Generator):
        return generator.get_state()
    if isinstance(generator, np.random.Generator):
        return copy.deepcopy(generator.bit_generator.state)
    if isinstance(generator, np.random.RandomState):
        return generator.get_state()
    try:
        return generator.getstate()
    except NotImplementedError:  # random.SystemRandom: the OS's entropy, nothing to put back
        return None


def _set_generator_state(generator: Any, state: Any) -> None:
    if isinstance(generator, torch.Generator):
        generator.set_state(state)
    elif isinstance(generator, np.random.Generator):
        generator.bit_generator.state = state
    elif isinstance(generator, np.random.RandomState):
        generator.set_state(state)
    else:
        generator.setstate(state)


def _length(batch: Mapping[str, Any]) -> int:
    return next((len(v) for v in batch.values() if isinstance(v, (torch.Tensor, list))), 0)


def _rows(batch: Mapping[str, Any], rows: slice) -> dict[str, Any]:
    """The rows ``rows`` of a collated batch (tensors and lists sliced along the batch dimension)."""
    return {k: v[rows] if isinstance(v, (torch.Tensor, list)) else v for k, v in batch.items()}
