"""Batching by shape: items of equal shape go into one batch, so nothing is padded or cropped and a descriptor does
not depend on which batch its image landed in. Used by the evaluation loaders (dalg.data.sampling) and by
in-memory extraction (dalg.inference)."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence


def batches_by_shape(
    shapes: Sequence[Hashable], batch_size: int, indices: Iterable[int] | None = None
) -> list[list[int]]:
    """Batches of at most ``batch_size`` indices whose ``shapes[i]`` are equal; the indices come from ``indices``
    (default: all, in order) and keep that order within a shape. Shapes appear in the order of their first index."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[Hashable, list[int]] = {}
    for i in range(len(shapes)) if indices is None else indices:
        groups.setdefault(shapes[i], []).append(int(i))
    return [idx[k : k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]
