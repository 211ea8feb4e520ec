"""Smoke tests of the DALG composer through the real configs (tiny CPU model)."""

from __future__ import annotations

import pytest
import torch

from dalg.factory import create_model
from dalg.models.composer import DALG


def build(name: str, num_classes: int = 7) -> DALG:
    model = create_model(name, num_classes=num_classes)
    assert isinstance(model, DALG)
    return model


@pytest.fixture(scope="module")
def tiny() -> DALG:
    torch.manual_seed(0)
    return build("dalg_tiny")


def test_tiny_forward_features_shapes_and_norm(tiny: DALG) -> None:
    x = torch.randn(2, 3, 100, 90)  # not multiples of the patch: padded to 7x6 tokens
    out = tiny.forward_features(x)
    assert set(out) == {"descriptor", "global", "local", "spatial_attention", "fusion_attention"}
    d = out["descriptor"]
    assert d.shape == (2, 512)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(2))
    assert out["global"].shape == (2, 256)
    assert out["local"].shape == (2, 128, 7, 6)
    assert out["spatial_attention"].shape == (2, 1, 7, 6)
    assert (out["spatial_attention"] > 0).all()  # softplus
    att = out["fusion_attention"]
    assert att.shape == (2, 4, 1, 42)
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 4, 1))


def test_tiny_backward_reaches_backbone_and_head(tiny: DALG) -> None:
    tiny.zero_grad()
    x = torch.randn(3, 3, 64, 64)
    y = torch.tensor([0, 3, 6])
    logits = tiny.head(tiny(x), y)
    assert logits.shape == (3, 7)
    torch.nn.functional.cross_entropy(logits, y).backward()
    patch_grad = tiny.backbone.vit.patch_embed.proj.weight.grad
    assert patch_grad is not None and patch_grad.abs().sum() > 0
    assert tiny.head.weight.grad is not None and tiny.head.weight.grad.abs().sum() > 0


def test_extract_single_scale_is_forward_and_multiscale_is_unit(tiny: DALG) -> None:
    tiny.eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(tiny.extract(x), tiny(x))
        ms = tiny.extract(x, scales=[0.7071, 1.0, 1.4142])
        single = tiny.extract(x)
    tiny.train()
    torch.testing.assert_close(ms.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(ms, single)


def test_no_head_without_classes() -> None:
    assert build("dalg_tiny", num_classes=0).head is None


def test_bf16_autocast_is_finite(tiny: DALG) -> None:
    """Masks (-1e4) and GeM stay finite in half precision, including padded and shifted windows."""
    tiny.zero_grad()
    x = torch.randn(2, 3, 100, 150)  # 7x10 tokens: padded to 8x12 windows of 4
    y = torch.tensor([1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = tiny.head(tiny(x), y)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in tiny.parameters() if p.grad is not None)
