"""Data sources indexed by the global micro-batch number, so a resumed run sees exactly the same batches.

Micro-batch ``k = iteration * grad_accum + micro`` of a run is always the same batch:

- :class:`MapStyleData` derives it from ``(seed, k)``: sample ``k * batch_size + j`` of the stream is
  index ``j'`` of the permutation of epoch ``e``, seeded with ``(seed, e)``. Nothing to save.
- :class:`FunctionData` calls ``fn(k)`` (synthetic or procedurally generated data).
- :class:`IterableData` calls ``factory(k)`` for an iterable that starts at micro-batch ``k`` (e.g. a
  DataLoader over a sampler that skips ``k * batch_size`` samples). The position is the saved iteration
  count; resume is exact when the factory honors its start argument.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from distill_mixins.trainer.seeding import mixed_seed
from torch import Tensor
from torch.utils.data import default_collate


@runtime_checkable
class DataSource(Protocol):
    """Anything with ``batch(step) -> batch`` for the global micro-batch index ``step``."""

    def batch(self, step: int) -> Any:
        """The micro-batch number ``step`` (0-based over the whole run)."""
        ...


class MapStyleData:
    """Batches of a map-style dataset (``__len__``, ``__getitem__``) from (seed, micro-batch index)."""

    def __init__(
        self, dataset: Any, batch_size: int, *, seed: int = 0, shuffle: bool = True,
        collate_fn: Callable[[list[Any]], Any] = default_collate,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("MapStyleData: the dataset is empty.")
        if batch_size < 1:
            raise ValueError(f"MapStyleData batch_size={batch_size} must be >= 1.")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.collate_fn = collate_fn
        self._epoch: tuple[int, Tensor] | None = None

    def _order(self, epoch: int) -> Tensor:
        if self._epoch is None or self._epoch[0] != epoch:
            n = len(self.dataset)
            if self.shuffle:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(mixed_seed(self.seed, epoch)))
            else:
                order = torch.arange(n)
            self._epoch = (epoch, order)
        return self._epoch[1]

    def indices(self, step: int) -> list[int]:
        """Dataset indices of micro-batch ``step``."""
        n = len(self.dataset)
        out = []
        for position in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(int(self._order(position // n)[position % n]))
        return out

    def batch(self, step: int) -> Any:
        """Collated samples of micro-batch ``step``."""
        return self.collate_fn([self.dataset[i] for i in self.indices(step)])


class FunctionData:
    """Micro-batch ``step`` is ``fn(step)``; ``fn`` must be a pure function of ``step`` for exact resume."""

    def __init__(self, fn: Callable[[int], Any]) -> None:
        self.fn = fn

    def batch(self, step: int) -> Any:
        """``fn(step)``."""
        return self.fn(step)


class IterableData:
    """Micro-batches from ``factory(start)``, an iterable beginning at micro-batch ``start``.

    Sequential reads advance one iterator; a jump forward skips batches; a jump backward (or the first read,
    e.g. on resume) calls the factory again with the new start.
    """

    def __init__(self, factory: Callable[[int], Iterable[Any]]) -> None:
        self.factory = factory
        self._iterator: Iterator[Any] | None = None
        self._position = -1

    def batch(self, step: int) -> Any:
        """The next batch of the iterable at position ``step``."""
        if self._iterator is None or step < self._position:
            iterable = self.factory(step)
            if isinstance(iterable, (dict, Tensor)):
                raise TypeError(
                    "IterableData: the factory returned a batch, not an iterable of batches; wrap a "
                    "step -> batch function in FunctionData instead."
                )
            self._iterator, self._position = iter(iterable), step
        while True:
            try:
                item = next(self._iterator)
            except StopIteration:
                raise RuntimeError(
                    f"IterableData: the iterable from factory({step}) ran out at micro-batch {self._position}; "
                    "make it endless (cycle epochs inside the factory) or lower TrainerConfig.iterations."
                ) from None
            self._position += 1
            if self._position > step:
                return item


def as_data_source(data: Any, *, batch_size: int | None, seed: int, shuffle: bool = True) -> DataSource:
    """A :class:`DataSource` from a data source, a map-style dataset (with ``batch_size``) or an iterable factory."""
    if isinstance(data, DataSource):
        return data
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        if batch_size is None:
            raise ValueError("a map-style dataset needs TrainerConfig.batch_size (samples per micro-batch).")
        return MapStyleData(data, batch_size, seed=seed, shuffle=shuffle)
    if callable(data):
        return IterableData(data)
    raise TypeError(
        f"cannot train on a {type(data).__name__}: give a DataSource (batch(step)), a map-style dataset with "
        "TrainerConfig.batch_size, or a factory(start_step) -> iterable of batches."
    )


def move_to(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor (in dicts, lists and tuples) on ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # named tuple
        return type(batch)(*(move_to(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch
