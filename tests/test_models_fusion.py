"""Fusions: one interface, their defining properties, and each of them inside the tiny DALG model."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir

from dalg.models.fusion import (
    ConcatFusion,
    CrossAttentionFusion,
    Fusion,
    GlobalOnlyFusion,
    HadamardFusion,
    LocalOnlyFusion,
    OrthogonalFusion,
)

CONF = str(Path(__file__).resolve().parents[1] / "conf")
FUSIONS = ["cross_attention", "orthogonal", "concat", "hadamard", "global_only", "local_only"]


@pytest.mark.parametrize("gdim", [24, 16])  # projected g (24 -> 16) and DOLG's equal widths
def test_orthogonal_component_is_orthogonal_to_g(gdim: int) -> None:
    torch.manual_seed(0)
    fu = OrthogonalFusion(global_dim=gdim, local_dim=16)
    g, local = torch.randn(3, gdim), torch.randn(3, 16, 4, 5) * 5 + 1
    orth = fu.orthogonal_component(g, local)
    gp = fu.g_proj(g)
    cos = torch.nn.functional.cosine_similarity(orth, gp[:, :, None, None].expand_as(orth), dim=1)
    assert cos.abs().max() < 1e-5
    # and the removed part is parallel to g: local - orth = alpha * g per position
    par = local - orth
    cos_par = torch.nn.functional.cosine_similarity(par, gp[:, :, None, None].expand_as(par), dim=1)
    torch.testing.assert_close(cos_par.abs(), torch.ones_like(cos_par))
    out = fu(g, local)
    assert out.fused.shape == (3, gdim + 16) and out.attention is None
    torch.testing.assert_close(out.fused[:, :gdim], g)


def test_cross_attention_global_to_local_weights_sum_to_one() -> None:
    fu = CrossAttentionFusion(global_dim=24, local_dim=16, heads=4)
    out = fu(torch.randn(2, 24), torch.randn(2, 16, 3, 5))
    assert out.attention.shape == (2, 4, 1, 15)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(2, 4, 1))
    assert (out.attention >= 0).all()
    assert out.fused.shape == (2, 40)


def test_cross_attention_local_to_global() -> None:
    fu = CrossAttentionFusion(global_dim=24, local_dim=16, deep_dim=12, heads=2, direction="local_to_global")
    out = fu(torch.randn(2, 24), torch.randn(2, 16, 3, 5), deep=torch.randn(2, 12, 3, 5))
    assert out.attention.shape == (2, 2, 15, 16)  # 15 local queries over g + 15 deep tokens
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(2, 2, 15))
    with pytest.raises(ValueError, match="deep"):
        fu(torch.randn(2, 24), torch.randn(2, 16, 3, 5))


def test_cross_attention_depends_on_position_encoding() -> None:
    """Permuting local tokens changes z only through the position encoding."""
    torch.manual_seed(0)
    g, local = torch.randn(1, 8), torch.randn(1, 8, 2, 3)
    perm = local.flatten(2)[:, :, torch.randperm(6)].reshape(1, 8, 2, 3)
    fu = CrossAttentionFusion(global_dim=8, local_dim=8, heads=2, pos_encoding=False)
    torch.testing.assert_close(fu(g, local).fused, fu(g, perm).fused)
    fu.pos_encoding = True
    assert not torch.allclose(fu(g, local).fused, fu(g, perm).fused)


def test_simple_fusions_by_hand() -> None:
    g, local = torch.randn(2, 6), torch.randn(2, 4, 3, 3)
    pooled = local.mean(dim=(2, 3))
    torch.testing.assert_close(ConcatFusion(6, 4)(g, local).fused, torch.cat([g, pooled], 1))
    had = HadamardFusion(6, 4)
    torch.testing.assert_close(had(g, local).fused, pooled * had.g_proj(g))
    torch.testing.assert_close(GlobalOnlyFusion(6, 0)(g, None).fused, g)
    torch.testing.assert_close(LocalOnlyFusion(0, 4)(None, local).fused, pooled)
    assert not GlobalOnlyFusion.uses_local and not LocalOnlyFusion.uses_global
    for cls in (ConcatFusion, HadamardFusion, OrthogonalFusion, CrossAttentionFusion):
        assert issubclass(cls, Fusion) and cls.uses_global and cls.uses_local


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_in_dalg_unit_512_and_grad_to_backbone(fusion: str) -> None:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="model/dalg_tiny", overrides=[f"model/fusion={fusion}"])
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg.model, num_classes=4)
    assert (model.global_branch is None) == (fusion == "local_only")
    assert (model.local_branch is None) == (fusion == "global_only")
    out = model.forward_features(torch.randn(2, 3, 64, 80))
    d = out["descriptor"]
    assert d.shape == (2, 512)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(2))
    assert (out["fusion_attention"] is not None) == (fusion == "cross_attention")
    assert (out["spatial_attention"] is None) == (fusion == "global_only")
    y = torch.tensor([1, 3])
    torch.nn.functional.cross_entropy(model.head(d, y), y).backward()
    grad = model.backbone.vit.patch_embed.proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    if model.local_branch is not None:
        # the local tap's own path: the first window block's projections get gradient
        assert model.local_branch.proj.weight.grad.abs().sum() > 0
