"""Batches of test images without distorting them: images are grouped by their exact resized shape."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from torch.utils.data import BatchSampler, DistributedSampler

from dalg.utils.batching import batches_by_shape


class SizeBucketBatchSampler(BatchSampler):
    """Batches of indices whose images have the same (height, width) after the test transform.

    Aspect-ratio bucketing: no padding and no crop, so a descriptor does not depend on which batch its image
    landed in. The indices come from ``sampler`` (default: all of ``sizes`` in order) and are grouped by size.

    Distributed evaluation works both ways Lightning can run it:

    * ``use_distributed_sampler=True`` (Lightning's default): Lightning rebuilds this batch sampler with a
      ``DistributedSampler`` as ``sampler`` (it subclasses ``BatchSampler`` and takes ``sampler``); each rank then
      buckets its own share and ``rank``/``world_size`` are ignored. The padded share repeats a few images,
      which the retrieval callback's gather collapses.
    * otherwise each rank takes every ``world_size``-th batch of the whole set; ranks may get different numbers
      of batches and the gather places descriptors by their index, so nothing is duplicated or lost.
    """

    def __init__(
        self,
        sizes: Sequence[tuple[int, int]],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        sampler: Iterable[int] | None = None,
        drop_last: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if drop_last:
            raise ValueError("SizeBucketBatchSampler never drops images: evaluation needs every descriptor")
        self.sizes = [tuple(s) for s in sizes]
        self.sampler = sampler if sampler is not None else range(len(self.sizes))
        self.batch_size = batch_size
        self.drop_last = False
        self.rank = rank
        self.world_size = world_size
        self._batches: list[list[int]] | None = None

    @property
    def batches(self) -> list[list[int]]:
        if self._batches is None:
            batches = batches_by_shape(self.sizes, self.batch_size, self.sampler)
            # a distributed sampler already gave this rank its share: splitting again would lose images
            if not isinstance(self.sampler, DistributedSampler):
                batches = batches[self.rank :: self.world_size]
            self._batches = batches
        return self._batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
