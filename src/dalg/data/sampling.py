"""Batches of test images without distorting them: images are grouped by their exact resized shape."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler


class SizeBucketBatchSampler(Sampler[list[int]]):
    """Batches of indices whose images have the same (height, width) after the test transform.

    Aspect-ratio bucketing: no padding and no crop, so a descriptor does not depend on which batch its image
    landed in. Under DDP each rank takes every ``world_size``-th batch; ranks may get different numbers of
    batches, and the gather step places descriptors by their index, so nothing is duplicated or lost.
    """

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, size in enumerate(sizes):
            buckets[tuple(size)].append(i)
        batches = [idx[k:k + batch_size] for _, idx in sorted(buckets.items()) for k in range(0, len(idx), batch_size)]
        self.batches = batches[rank::world_size]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
