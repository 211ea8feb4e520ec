"""Checkpoints are written atomically: a failure while writing leaves the previous file whole."""

from unittest import mock

import pytest
import torch

from dalg.lit.checkpoint_io import AtomicCheckpointIO


def test_atomic_save_replaces_and_survives_a_failed_write(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    assert io.load_checkpoint(path)["global_step"] == 1

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    with (
        mock.patch("dalg.lit.checkpoint_io.torch.save", broken_save),
        pytest.raises(OSError, match="disk full"),
    ):
        io.save_checkpoint({"global_step": 2}, path)
    assert io.load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left behind

    io.save_checkpoint({"global_step": 3}, path)
    assert io.load_checkpoint(path)["global_step"] == 3
    io.remove_checkpoint(path)
    assert not path.exists()
