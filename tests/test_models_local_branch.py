"""Local branch: window attention (padding masked, shifted windows), multi-atrous block, spatial attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dalg.models.local_branch import LocalBranch, SpatialAttention, WindowAttention, WindowBlock


def _block(shift: int, mask_padding: bool = True) -> WindowBlock:
    torch.manual_seed(0)
    blk = WindowBlock(dim=16, heads=2, window=4, shift=shift, mask_padding=mask_padding).eval()
    with torch.no_grad():  # a non-zero relative bias, so the test also covers its indexing
        blk.attn.rel_bias.normal_()
    return blk


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("hw", [(5, 7), (6, 6), (3, 9)])
def test_padding_does_not_change_real_positions(shift: int, hw: tuple[int, int]) -> None:
    x = torch.randn(2, *hw, 16)
    blk = _block(shift)
    with torch.no_grad():
        ref = blk(x)
        blk.pad_value = 37.0  # whatever sits in the padding must not reach a real token
        moved = blk(x)
    assert ref.shape == x.shape
    torch.testing.assert_close(moved, ref, rtol=0, atol=1e-5)


def test_padding_leaks_without_the_mask() -> None:
    """The check above can fail: with masking off, padding content changes real outputs."""
    x = torch.randn(2, 5, 7, 16)
    blk = _block(0, mask_padding=False)
    with torch.no_grad():
        ref = blk(x)
        blk.pad_value = 37.0
        assert (blk(x) - ref).abs().max() > 1e-3


def test_single_window_equals_full_attention_on_real_tokens() -> None:
    """A 3x3 map in one 4x4 window (padded, masked) = plain MHSA over the 9 real tokens with the right bias."""
    torch.manual_seed(1)
    attn = WindowAttention(dim=8, heads=2, window=4)
    with torch.no_grad():
        attn.rel_bias.normal_()
    blk = WindowBlock(dim=8, heads=2, window=4)
    blk.attn = attn
    x = torch.randn(1, 3, 3, 8)
    with torch.no_grad():
        got = blk(x)
        # reference: attention among the 9 real tokens only, bias looked up by hand from the table
        t = blk.norm1(x).reshape(1, 9, 8)
        q, k, v = attn.qkv(t).reshape(1, 9, 3, 2, 4).permute(2, 0, 3, 1, 4)
        pos = [(i, j) for i in range(3) for j in range(3)]
        bias = torch.stack(
            [
                torch.stack([attn.rel_bias[(a[0] - b[0] + 3) * 7 + (a[1] - b[1] + 3)] for b in pos])
                for a in pos
            ]
        ).permute(2, 0, 1)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4) + bias, dim=-1)
        y = attn.proj((w @ v).transpose(1, 2).reshape(1, 9, 8)).reshape(1, 3, 3, 8)
        y = x + y
        y = y + blk.mlp(blk.norm2(y))
    torch.testing.assert_close(got, y, rtol=1e-5, atol=1e-5)


def test_shifted_block_differs_from_unshifted() -> None:
    x = torch.randn(1, 8, 8, 16)
    a, b = _block(0), _block(2)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert (a(x) - b(x)).abs().max() > 1e-3


def test_spatial_attention_matches_formula() -> None:
    torch.manual_seed(2)
    sa = SpatialAttention(6, 5).eval()
    with torch.no_grad():
        sa.bn.running_mean.normal_()
        sa.bn.running_var.uniform_(0.5, 2.0)
        x = torch.randn(2, 6, 3, 4)
        out, att = sa(x)
        f = sa.bn(sa.conv(x))
        a = F.softplus(sa.score(F.relu(f)))
        torch.testing.assert_close(att, a)
        torch.testing.assert_close(out, a * f / f.norm(dim=1, keepdim=True))
    assert att.shape == (2, 1, 3, 4) and (att > 0).all()


@pytest.mark.parametrize("context", ["window", "atrous", "none"])
def test_local_branch_shapes_and_grad(context: str) -> None:
    lb = LocalBranch(in_dim=24, dim=32, context=context, window=3, blocks=2, heads=4, atrous_dim=8)
    x = torch.randn(2, 24, 5, 7, requires_grad=True)
    local, att = lb(x)
    assert local.shape == (2, 32, 5, 7) and att.shape == (2, 1, 5, 7)
    local.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert len(lb.window_blocks) == (2 if context == "window" else 0)


def test_alternate_blocks_are_shifted() -> None:
    lb = LocalBranch(in_dim=8, dim=16, window=4, blocks=3, heads=2)
    assert [b.shift for b in lb.window_blocks] == [0, 2, 0]
    assert [
        b.shift for b in LocalBranch(in_dim=8, dim=16, window=4, blocks=2, heads=2, shift=False).window_blocks
    ] == [0, 0]


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="context"):
        LocalBranch(in_dim=8, context="conv")
    with pytest.raises(ValueError, match="divisible"):
        LocalBranch(in_dim=8, dim=10, heads=4)


def _dolg_local_reference(lb: LocalBranch, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DOLG's released local branch (ASPP + SpatialAttention2d, core/model/dolg_model.py) written out as formulas
    on the weights of `lb`: branch_r = conv3x3_r(x) (dilation = padding = r), pool = relu(conv1x1(mean_hw(x)))
    broadcast to h x w, y = relu(conv1x1([branches ; pool])); f = BN(conv1x1(y)), a = softplus(conv1x1(relu(f))),
    out = a * f / ||f||."""
    ma, sa = lb.proj, lb.attention
    outs = [F.conv2d(x, ma.branches[0].weight, ma.branches[0].bias)]
    for conv, r in zip(ma.branches[1:], (6, 12, 18)):
        outs.append(F.conv2d(x, conv.weight, conv.bias, padding=r, dilation=r))
    pooled = F.conv2d(x.mean(dim=(2, 3), keepdim=True), ma.pool_conv.weight, ma.pool_conv.bias).clamp(min=0)
    outs.append(pooled.expand(-1, -1, x.shape[2], x.shape[3]))
    y = F.conv2d(torch.cat(outs, 1), ma.fuse.weight, ma.fuse.bias).clamp(min=0)
    f = F.conv2d(y, sa.conv.weight, sa.conv.bias)
    bn = sa.bn
    f = (f - bn.running_mean[:, None, None]) / (bn.running_var[:, None, None] + bn.eps).sqrt()
    f = f * bn.weight[:, None, None] + bn.bias[:, None, None]
    a = F.softplus(F.conv2d(f.clamp(min=0), sa.score.weight, sa.score.bias))
    return a * f / f.norm(dim=1, keepdim=True), a


def test_dolg_local_branch_matches_the_released_formulas() -> None:
    torch.manual_seed(3)
    lb = LocalBranch(in_dim=12, dim=16, context="atrous", atrous_dim=8).double().eval()
    with torch.no_grad():  # non-trivial BN statistics; a negative-leaning pooled branch, so its ReLU matters
        lb.attention.bn.running_mean.normal_()
        lb.attention.bn.running_var.uniform_(0.5, 2.0)
        lb.attention.bn.weight.normal_()
        lb.proj.pool_conv.bias.sub_(0.5)
        x = torch.randn(2, 12, 9, 11, dtype=torch.float64)
        out, att = lb(x)
        ref_out, ref_att = _dolg_local_reference(lb, x)
        assert (
            F.conv2d(x.mean(dim=(2, 3), keepdim=True), lb.proj.pool_conv.weight, lb.proj.pool_conv.bias) < 0
        ).any()  # the ReLU acts
    torch.testing.assert_close(att, ref_att, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)


def _swin_reference(blk: WindowBlock, x: torch.Tensor) -> torch.Tensor:
    """A (shifted) window block as plain attention over all tokens of one image with a group mask. Swin's
    partition in the map's own coordinates: along an axis longer than the window, windows of `window` tokens
    displaced by `shift` (the first holds the `shift` leading tokens; cyclic shift + region mask implement this);
    along an axis no longer than the window, one window (the map's side) and no shift. Bias by (di, dj) offset."""
    ws, s = blk.window, blk.shift
    _, h, w, c = x.shape
    attn = blk.attn
    heads, d = attn.heads, c // attn.heads

    def group(n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.long) if n <= ws else (torch.arange(n) + (ws - s) % ws) // ws

    gi, gj = torch.meshgrid(group(h), group(w), indexing="ij")
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    gi, gj, ii, jj = gi.flatten(), gj.flatten(), ii.flatten(), jj.flatten()
    same = (gi[:, None] == gi[None, :]) & (gj[:, None] == gj[None, :])
    table_idx = (ii[:, None] - ii[None, :] + ws - 1) * (2 * ws - 1) + (jj[:, None] - jj[None, :] + ws - 1)
    bias = attn.rel_bias[table_idx.where(same, 0)].permute(
        2, 0, 1
    )  # (heads, N, N); other groups masked below
    t = blk.norm1(x).reshape(1, h * w, c)
    q, k, v = attn.qkv(t).reshape(1, h * w, 3, heads, d).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-1, -2) / math.sqrt(d) + bias).masked_fill(~same, float("-inf"))
    y = attn.proj((torch.softmax(logits, dim=-1) @ v).transpose(1, 2).reshape(1, h * w, c)).reshape(
        1, h, w, c
    )
    y = x + y
    return y + blk.mlp(blk.norm2(y))


@pytest.mark.parametrize("shift", [0, 3])
@pytest.mark.parametrize("hw", [(5, 20), (20, 5), (3, 20), (9, 10)])
def test_window_block_matches_swin_partition_on_thin_maps(shift: int, hw: tuple[int, int]) -> None:
    """Window 7: on a 5x20 map Swin uses 5x7 windows shifted along the long axis only (5 <= 7). The old rule
    (shift both axes unless one window covers the map) split the 5 rows into groups {0,1,2} and {3,4}; with 3
    rows (<= shift) both rules agree. 9x10: both axes longer than the window, the plain shifted-window case,
    checks the reference itself."""
    torch.manual_seed(4)
    blk = WindowBlock(dim=8, heads=2, window=7, shift=shift).eval()
    with torch.no_grad():
        blk.attn.rel_bias.normal_()
        x = torch.randn(1, *hw, 8)
        torch.testing.assert_close(blk(x), _swin_reference(blk, x), rtol=1e-5, atol=1e-5)
