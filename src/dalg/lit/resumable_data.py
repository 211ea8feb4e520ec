"""A training DataLoader whose order and augmentations depend only on (seed, epoch, image), and which Lightning can
save and restore mid-epoch.

Lightning restores the step counters from a mid-epoch checkpoint but, for an ordinary DataLoader, starts a *fresh*
shuffle and takes its first remaining-many batches, so an interrupted run sees different data than an
uninterrupted one. Lightning saves and restores a train loader that has ``state_dict``/``load_state_dict``
(``fit_loop`` "combined_loader" state); this module provides one:

- ``EpochPermutation``: a sampler that draws the permutation of epoch ``e`` from ``seed + e``, keeps this
  process's share (``rank::world``, padded to equal length, so DDP needs no DistributedSampler) and can skip the
  batches a restored run has already trained on;
- ``SeededSamples``: reads item ``(index, sample_seed)`` under a forked torch RNG seeded with ``sample_seed``, so
  random crops/flips/jitter of an image in an epoch do not depend on workers, prefetching or interruptions;
- ``ResumableLoader``: a DataLoader over both whose state is ``{epoch, consumed_batches}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 998_244_353 + index * 2_654_435_761) % (2**63 - 1)


class EpochPermutation(Sampler[tuple[int, int]]):
    """Yields ``(index, sample_seed)`` for this rank's share of the permutation of epoch ``self.epoch``."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        if size <= 0:
            raise ValueError("EpochPermutation: empty dataset")
        self.size = size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.skip = 0  # samples of this epoch already trained on (set when a checkpoint is restored)

    def set_epoch(self, epoch: int) -> None:  # called by Lightning before each epoch
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.size / _rank_world()[1])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rank, world = _rank_world()
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        per_rank = math.ceil(self.size / world)
        order = torch.cat([order, order[: per_rank * world - self.size]])  # pad like DistributedSampler
        mine = order[rank::world].tolist()
        start, self.skip = self.skip, 0
        for i in mine[start:]:
            yield i, sample_seed(self.seed, self.epoch, i)


class SeededSamples(Dataset):
    """``dataset[index]`` drawn under torch's RNG seeded with ``sample_seed`` (the caller's RNG is untouched)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]

    def __getattr__(self, name: str) -> Any:  # num_classes, label_map, ... of the wrapped set
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ResumableLoader(DataLoader):
    """The training loader; ``consumed_batches()`` tells how many batches of the current epoch were trained on
    (the trainer's counter, since the loader itself runs ahead by its prefetch)."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        drop_last: bool = True,
        consumed_batches: Callable[[], int] | None = None,
        **kwargs: Any,
    ):
        self.permutation = EpochPermutation(len(dataset), seed)  # type: ignore[arg-type]
        # worker seeds come from this generator, not from the global RNG (which the model's dropout uses)
        kwargs.setdefault("generator", torch.Generator().manual_seed(int(seed)))
        super().__init__(
            SeededSamples(dataset),
            batch_sampler=BatchSampler(self.permutation, batch_size, drop_last),
            **kwargs,
        )
        self.consumed_batches = consumed_batches

    @classmethod
    def wrap(
        cls, loader: DataLoader, seed: int, consumed_batches: Callable[[], int] | None = None
    ) -> ResumableLoader:
        """The same dataset, batch size, workers and collate function as ``loader``, in resumable order."""
        if loader.batch_size is None:
            raise ValueError(
                "ResumableLoader.wrap: the training loader must use batch_size (no custom batch_sampler)"
            )
        return cls(
            loader.dataset,
            loader.batch_size,
            seed,
            drop_last=loader.drop_last,
            consumed_batches=consumed_batches,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            persistent_workers=loader.persistent_workers,
            worker_init_fn=loader.worker_init_fn,
        )

    def state_dict(self) -> dict[str, int]:
        consumed = int(self.consumed_batches()) if self.consumed_batches else 0
        return {"epoch": self.permutation.epoch, "consumed_batches": consumed, "seed": self.permutation.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state.get("seed", self.permutation.seed)) != self.permutation.seed:
            raise ValueError(
                f"checkpoint's data order seed {state['seed']} differs from this run's "
                f"seed {self.permutation.seed}: resume with the same seed"
            )
        consumed = int(state["consumed_batches"])
        if consumed >= len(self.batch_sampler):  # saved at the end of an epoch: the next one starts fresh
            self.permutation.epoch, self.permutation.skip = int(state["epoch"]) + 1, 0
        else:
            self.permutation.epoch = int(state["epoch"])
            self.permutation.skip = consumed * self.batch_sampler.batch_size  # type: ignore[union-attr]
