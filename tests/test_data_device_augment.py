"""Colour jitter + normalisation on the batch (dalg.data.device_augment) and where the data module applies it."""

from __future__ import annotations

import itertools

import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image

from dalg.data.datamodules import RetrievalDataModule
from dalg.data.device_augment import DeviceAugment
from dalg.data.transforms import holdout_transform, train_transform

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
OPS = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)


def _images(n: int = 6, h: int = 9, w: int = 11, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)


def test_jitter_is_torchvisions_color_jitter_in_the_drawn_order() -> None:
    aug = DeviceAugment(0.4, MEAN, STD)
    images = _images(n=6)
    orders = torch.tensor(list(itertools.permutations(range(3))))  # every order once
    factors = torch.tensor([[0.6, 1.4, 0.7], [1.3, 0.8, 1.35], [1.0, 1.0, 0.6]] * 2)
    got = aug(images, drawn=(factors, orders))
    for i in range(6):  # torchvision's float ops, one image at a time, in that image's order
        x = images[i].float() / 255
        for op in orders[i].tolist():
            x = OPS[op](x, float(factors[i, op]))
        want = F.normalize(x, MEAN, STD)
        torch.testing.assert_close(got[i], want, atol=2e-6, rtol=0)


def test_without_jitter_it_only_normalises() -> None:
    images = _images()
    cl = images.contiguous(memory_format=torch.channels_last)  # any memory layout
    torch.testing.assert_close(
        DeviceAugment(0.3, MEAN, STD)(cl, generator=torch.Generator().manual_seed(0)),
        DeviceAugment(0.3, MEAN, STD)(images, generator=torch.Generator().manual_seed(0)),
    )
    want = F.normalize(images.float() / 255, MEAN, STD)
    torch.testing.assert_close(DeviceAugment(0.0, MEAN, STD)(images), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(DeviceAugment(0.3, MEAN, STD)(images, jitter=False), want, atol=1e-6, rtol=0)


def test_draws_are_per_image_within_range_and_reproducible() -> None:
    aug = DeviceAugment(0.2, MEAN, STD)
    factors, order = aug.draw(500, torch.device("cpu"), torch.Generator().manual_seed(1))
    assert factors.min() >= 0.8 and factors.max() <= 1.2 and factors.std() > 0.1
    assert (order.sort(dim=1).values == torch.arange(3)).all()  # permutations
    assert len({tuple(o) for o in order.tolist()}) == 6  # all six orders occur
    a = aug(_images(), generator=torch.Generator().manual_seed(5))
    b = aug(_images(), generator=torch.Generator().manual_seed(5))
    c = aug(_images(), generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="expected uint8 images"):
        DeviceAugment(0.2, MEAN, STD)(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="color_jitter"):
        DeviceAugment(1.5, MEAN, STD)


def test_train_transform_ends_in_uint8_and_finish_gives_the_model_input() -> None:
    img = Image.new("RGB", (40, 30), (200, 100, 50))
    tf = train_transform(16, scale=(0.5, 1.0), color_jitter=0.0)
    x = tf(img)
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 16, 16)
    y = tf.finish(x)  # one flat colour: normalised exactly
    want = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(tf.input_config.mean)) / torch.tensor(
        tf.input_config.std
    )
    torch.testing.assert_close(y[:, 0, 0], want.float(), atol=1e-6, rtol=0)
    assert holdout_transform(16).device_augment is None  # the hold-out is normalised in the worker


def test_the_data_module_finishes_uint8_batches_after_the_transfer() -> None:
    dm = RetrievalDataModule(root=None, color_jitter=0.2)
    dm.set_input_config({"mean": MEAN, "std": STD})

    class _Set:
        transform = train_transform(8, input_config=dm.input_config, color_jitter=0.2)

    labels = torch.arange(4)
    floats = torch.zeros(4, 3, 8, 8)
    assert dm.on_after_batch_transfer((floats, labels), 0)[0] is floats  # hold-out / eval batches pass
    with pytest.raises(RuntimeError, match="no device_augment"):
        dm.on_after_batch_transfer((_images(4, 8, 8), labels), 0)
    dm.train_set = _Set()
    images, out_labels = dm.on_after_batch_transfer((_images(4, 8, 8), labels), 0)
    assert images.dtype == torch.float32 and out_labels is labels
    plain = DeviceAugment(0.0, MEAN, STD)(_images(4, 8, 8))
    assert not torch.allclose(images, plain)  # jittered
    assert (images - plain).abs().mean() < 0.5  # lightly


def test_jitter_draws_follow_the_batch_index_and_rank_not_a_carried_stream() -> None:
    """What makes a resumed run jitter its batches as the uninterrupted run did: the draws depend on the fit's
    batch counter (which Lightning restores from the checkpoint) and the rank, nothing else."""
    from types import SimpleNamespace

    def module_at(index: int, rank: int = 0) -> RetrievalDataModule:
        dm = RetrievalDataModule(root=None, color_jitter=0.3)
        dm.set_input_config({"mean": MEAN, "std": STD})
        dm.train_set = SimpleNamespace(
            transform=train_transform(8, input_config=dm.input_config, color_jitter=0.3)
        )
        progress = SimpleNamespace(total=SimpleNamespace(ready=index))
        dm.trainer = SimpleNamespace(  # the attributes the data module reads
            training=True,
            current_epoch=0,
            global_rank=rank,
            fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
        )
        return dm

    batch = (_images(4, 8, 8), torch.arange(4))
    torch.manual_seed(0)
    a = module_at(7).on_after_batch_transfer(batch, 0)[0]
    fresh = module_at(7)  # a new process after a resume: same batch index, same draws
    fresh.on_after_batch_transfer(batch, 0)  # the module's own earlier batches do not shift them
    assert torch.equal(fresh.on_after_batch_transfer(batch, 0)[0], a)
    assert not torch.allclose(module_at(8).on_after_batch_transfer(batch, 0)[0], a)  # next batch
    assert not torch.allclose(module_at(7, rank=1).on_after_batch_transfer(batch, 0)[0], a)  # other rank
