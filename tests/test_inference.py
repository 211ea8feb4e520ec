"""dalg.inference: optimised extraction equals plain DALG.extract (float32 options exactly, bf16 closely)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dalg.factory import create_model
from dalg.inference import (
    InferenceOptions,
    LowPrecisionIsland,
    extract_images,
    group_by_shape,
    is_cnn,
    optimize_for_inference,
)
from dalg.lit.module import RetrievalModule
from dalg.models.multiscale import effective_scales

_MODELS: dict[str, torch.nn.Module] = {}


def _model(name: str, tmp_path) -> torch.nn.Module:
    """Built once per module (optimize_for_inference works on a copy, so tests cannot change it)."""
    if name in _MODELS:
        return _MODELS[name]
    torch.manual_seed(0)
    model = create_model(name).eval()
    # non-trivial BatchNorm statistics, so that a wrong eval/train mode would show
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    _MODELS[name] = model
    return model


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shapes = [(3, 64, 48), (3, 48, 64), (3, 64, 48), (3, 64, 64)]
    return [torch.randn(s, generator=g) for s in shapes]


@pytest.mark.parametrize("name", ["dalg_tiny", "dolg_tiny"])
def test_fp32_options_match_plain_extract(name, tmp_path, images):
    model = _model(name, tmp_path)
    x = torch.stack([images[0], images[2]])
    ref = model.extract(x)
    fast = optimize_for_inference(model, InferenceOptions(channels_last=None, bf16=False))
    assert fast.options.channels_last == (name == "dolg_tiny")
    assert fast.options.label() == ("channels-last" if name == "dolg_tiny" else "fp32")
    out = fast.extract(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    # the model passed in is untouched (still train-able parameters, not channels-last)
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.requires_grad is False for p in fast.model.parameters())


@pytest.mark.parametrize("name", ["dalg_tiny", "dolg_tiny"])
def test_bf16_close_to_fp32_and_descriptors_stay_float32(name, tmp_path, images):
    model = _model(name, tmp_path)
    x = torch.stack([images[0], images[2]])
    ref = model.extract(x)
    fast = optimize_for_inference(model, InferenceOptions(bf16=True))
    assert isinstance(fast.model.backbone, LowPrecisionIsland)
    assert next(fast.model.backbone.parameters()).dtype == torch.bfloat16
    assert fast.model.descriptor.weight.dtype == torch.float32  # the head stays float32
    out = fast.extract(x)
    assert out.dtype == torch.float32
    cos = (out * ref).sum(dim=1)
    assert torch.all(cos > 0.98), cos  # bf16 keeps ~3 significant digits
    assert not torch.allclose(out, ref, atol=1e-7)  # it really ran in bf16


def test_scales_and_batching_by_shape_match_per_image(tmp_path, images):
    model = _model("dolg_tiny", tmp_path)
    fast = optimize_for_inference(model, InferenceOptions(bf16=False))
    per_image = torch.cat([model.extract(im[None]) for im in images])
    batched = extract_images(fast, images, max_batch=4)
    torch.testing.assert_close(batched, per_image, atol=2e-5, rtol=1e-4)
    groups = group_by_shape(images, max_batch=4)
    assert sorted(len(i) for i, _ in groups) == [1, 1, 2]  # the two 64x48 images share a batch
    with pytest.raises(ValueError, match="scales"):
        fast.extract(images[0][None], scales=[])
    with pytest.raises(ValueError, match="max_batch"):
        group_by_shape(images, max_batch=0)


def test_automatic_bf16_follows_the_device(tmp_path, monkeypatch):
    import dalg.inference as inf

    model = _model("dalg_tiny", tmp_path)
    monkeypatch.setattr(inf, "cpu_has_fast_bf16", lambda: False)
    assert optimize_for_inference(model).options.bf16 is False
    monkeypatch.setattr(inf, "cpu_has_fast_bf16", lambda: True)
    assert optimize_for_inference(model).options.bf16 is True


def test_is_cnn(tmp_path):
    assert is_cnn(_model("dolg_tiny", tmp_path))
    assert not is_cnn(_model("dalg_tiny", tmp_path))


@pytest.mark.slow  # inductor compiles one graph per shape: ~30-60 s on 2 cores
def test_compiled_frozen_extract_matches_plain(tmp_path, images):
    model = _model("dalg_tiny", tmp_path)
    x = torch.stack([images[0], images[2]])
    fast = optimize_for_inference(model, InferenceOptions(bf16=False, compile=True))
    assert fast.options.label() == "compile"
    torch.testing.assert_close(fast.extract(x), model.extract(x), atol=2e-5, rtol=1e-4)
    # a second shape compiles its own graph and still agrees
    y = images[3][None]
    torch.testing.assert_close(fast.extract(y), model.extract(y), atol=2e-5, rtol=1e-4)


class _TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


@pytest.mark.slow  # ten small graphs: ~20-40 s on 2 cores
def test_compile_keeps_compiling_past_dynamos_default_of_eight_shapes():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    net = _TinyNet().eval()
    fast = optimize_for_inference(net, InferenceOptions(bf16=False, channels_last=False, compile=True))
    before = counters["stats"]["unique_graphs"]
    for side in range(8, 18):  # ten shapes
        x = torch.randn(1, 3, side, side + 1)
        torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] - before == 10  # no silent fall-back to eager after 8


def test_one_scale_fallback() -> None:
    """Given scales win, else the model's own, else 1 alone: for extract, inference and evaluation alike."""
    net = SimpleNamespace(scales=(0.5, 1.0))
    assert effective_scales(None, net) == (0.5, 1.0)
    assert effective_scales([2, 1], net) == (2.0, 1.0)
    assert effective_scales(None, object()) == (1.0,)
    with pytest.raises(ValueError, match="scales"):
        effective_scales([], net)
    test_scales = RetrievalModule.test_scales.fget
    assert test_scales(SimpleNamespace(eval_scales=None, net=net)) == (0.5, 1.0)
    assert test_scales(SimpleNamespace(eval_scales=(0.7071,), net=net)) == (0.7071,)
