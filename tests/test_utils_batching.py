"""Batching by shape (dalg.utils.batching): equal shapes share batches, every index once, order kept."""

import pytest

from dalg.utils.batching import batches_by_shape


def test_batches_group_equal_shapes_and_keep_every_index_once():
    shapes = [(2, 3), (3, 2), (2, 3), (2, 3), (3, 2), (1, 1)]
    batches = batches_by_shape(shapes, 2)
    assert batches == [[0, 2], [3], [1, 4], [5]]  # shapes in order of first appearance, indices in order
    assert batches_by_shape(shapes, 2, indices=[3, 1, 0]) == [[3, 0], [1]]  # only the given indices


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        batches_by_shape([(1, 1)], 0)
