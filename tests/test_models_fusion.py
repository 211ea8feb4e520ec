"""Fusions: one interface, their defining properties, and each of them inside the tiny DALG model."""

from __future__ import annotations

import pytest
import torch

from dalg.factory import create_model, fusion_names
from dalg.models.fusion import (
    ConcatFusion,
    CrossAttentionFusion,
    Fusion,
    GlobalOnlyFusion,
    HadamardFusion,
    LocalOnlyFusion,
    OrthogonalFusion,
)

FUSIONS = fusion_names()  # conf/model/fusion/*.yaml
DIRECTIONS = ["global_to_local", "local_to_global"]


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


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_cross_attention_depends_on_position_encoding(direction: str) -> None:
    """Permuting local tokens changes z only through the position encoding."""
    torch.manual_seed(0)
    g, local, deep = torch.randn(1, 8), torch.randn(1, 8, 2, 3), torch.randn(1, 4, 2, 3)
    perm = local.flatten(2)[:, :, torch.randperm(6)].reshape(1, 8, 2, 3)
    fu = CrossAttentionFusion(global_dim=8, local_dim=8, deep_dim=4, heads=2, direction=direction)
    plain = CrossAttentionFusion(
        global_dim=8, local_dim=8, deep_dim=4, heads=2, direction=direction, pos_encoding=False
    )
    plain.load_state_dict(fu.state_dict(), strict=False)  # the same network less its position terms
    assert not any("pos" in k for k in plain.state_dict())
    torch.testing.assert_close(plain(g, local, deep).fused, plain(g, perm, deep).fused)
    assert not torch.allclose(fu(g, local, deep).fused, fu(g, perm, deep).fused)


def _smooth_map(channels: int, size: int, seed: int, norm: float = 0.7) -> torch.Tensor:
    """A smooth random map (4x4 random values, bilinear) at size x size tokens; mean token norm ~ `norm` (local
    tokens are attention x unit vectors, norm ~0.7 at init)."""
    base = torch.randn(1, channels, 4, 4, generator=torch.Generator().manual_seed(seed))
    m = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
    return m * norm / m.norm(dim=1).mean()


def _update(
    fu: CrossAttentionFusion, g: torch.Tensor, local: torch.Tensor, deep: torch.Tensor
) -> torch.Tensor:
    """What the block adds: z - g's query (global_to_local); z, the mean updated local token (local_to_global)."""
    z = fu(g, local, deep).fused[:, fu.global_dim :]
    return z - fu.g_proj(g) if fu.direction == "global_to_local" else z


def _fusion(direction: str, seed: int = 0, **kw) -> CrossAttentionFusion:
    torch.manual_seed(seed)
    return CrossAttentionFusion(
        global_dim=64, local_dim=32, deep_dim=48, heads=4, direction=direction, **kw
    ).eval()


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_cross_attention_update_depends_on_local_content(direction: str) -> None:
    """Zeroing the local content must change the update about as much as without any position encoding. Here:
    52% (51% without position) global_to_local, 23% (23%) local_to_global, whose update is mostly the deep
    tokens' values; the old fixed encoding (norm ~16 against ~0.7) left 11% (85%) and 7% (42%)."""
    g = torch.randn(1, 64, generator=torch.Generator().manual_seed(5))
    local, deep = _smooth_map(32, 16, seed=1), _smooth_map(48, 16, seed=2, norm=5.0)
    fu = _fusion(direction)
    plain = _fusion(direction, pos_encoding=False)
    plain.load_state_dict(fu.state_dict(), strict=False)
    with torch.no_grad():
        change = {}
        for name, m in (("pos", fu), ("plain", plain)):
            u = _update(m, g, local, deep)
            change[name] = float((u - _update(m, g, torch.zeros_like(local), deep)).norm() / u.norm())
    assert change["pos"] > 0.8 * change["plain"], change
    if direction == "global_to_local":
        assert change["pos"] > 0.3, change


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_cross_attention_is_stable_across_grid_sizes(direction: str) -> None:
    """The same smooth image content at 16x16 and 32x32 tokens gives the same update (the old integer-index
    encoding: cosine 0.93-0.95); 8x8 too, where the highest frequency has 2 tokens per period."""
    g = torch.randn(2, 64, generator=torch.Generator().manual_seed(6))
    fu = _fusion(direction)
    with torch.no_grad():
        for name, p in fu.named_parameters():
            if "pos" in name:
                p.mul_(5.0)  # a position term larger than at init, as after training
        out = {
            n: _update(
                fu,
                g,
                torch.cat([_smooth_map(32, n, 1), _smooth_map(32, n, 2)]),
                torch.cat([_smooth_map(48, n, 3, 5.0), _smooth_map(48, n, 4, 5.0)]),
            )
            for n in (8, 16, 32)
        }
    cos = torch.nn.functional.cosine_similarity
    assert cos(out[16], out[32]).min() > 0.999
    assert cos(out[8], out[32]).min() > 0.99


def test_position_is_in_the_keys_only() -> None:
    """A constant local map: every value is the same, so where attention goes cannot matter, and the position
    term (keys only) must not change the update; the old encoding added to the values did."""
    fu = _fusion("global_to_local")
    plain = _fusion("global_to_local", pos_encoding=False)
    plain.load_state_dict(fu.state_dict(), strict=False)
    g, local = torch.randn(1, 64), torch.randn(1, 32, 1, 1).expand(1, 32, 5, 6)
    with torch.no_grad():
        for name, p in fu.named_parameters():
            if "pos" in name:
                p.normal_(std=3.0)  # a strong position term
        torch.testing.assert_close(
            _update(fu, g, local, None), _update(plain, g, local, None), rtol=1e-5, atol=1e-5
        )


def test_local_to_global_weighs_g_against_the_mean_deep_token() -> None:
    """g's share of each local query's attention does not shrink with the number of deep tokens (its logit gets
    + log n_deep); without that, it drops ~4x from 16x16 to 32x32 tokens."""
    fu = _fusion("local_to_global")
    g = torch.randn(1, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        share = {
            n: fu(g, _smooth_map(32, n, 1), _smooth_map(48, n, 3, 5.0)).attention[..., 0].mean()
            for n in (16, 32)
        }
    assert 0.05 < share[16] < 0.95
    torch.testing.assert_close(share[32], share[16], rtol=0.02, atol=0)


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
    torch.manual_seed(0)
    model = create_model("dalg_tiny", fusion=fusion, num_classes=4)
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
