"""Local branch: 1x1 projection -> context blocks -> spatial attention (dalg.md).

Context blocks are either Swin-style window multi-head self-attention (DALG; Liu et al., ICCV 2021: W-MSA with
relative position bias, alternate shifted windows) or DOLG's multi-atrous block (Yang et al., ICCV 2021).
Maps whose sides are not multiples of the window are padded; padded tokens are masked out as keys, so the
outputs at real positions do not depend on the padding (tested). Along an axis no longer than the window, the window
is clamped to the map and not shifted (Swin's rule, per axis as in timm's SwinTransformerBlock): windows can be
rectangular on thin maps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

MASK_VALUE = (
    -1e4
)  # additive mask: exp(-1e4) == 0 in fp32/fp16/bf16, and finite so fully masked rows stay finite


def _relative_index(wh: int, ww: int, window: int, device: torch.device | None = None) -> Tensor:
    """(wh*ww, wh*ww) indices into the (2*window-1)^2 relative-bias table for a wh x ww window (wh, ww <= window)."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device), indexing="ij")
    ).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, N, N), >= 0
    return rel[0] * (2 * window - 1) + rel[1]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows (at most window x window) with a learnt relative position bias."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"WindowAttention: dim={dim} not divisible by heads={heads}")
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_bias = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.rel_bias, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        """x: (B*nW, N, C); mask: (nW, N, N) additive, or None; size: the (wh, ww) window, default square."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        # built per call (a few aranges) rather than cached for the square window: one path for every window
        # size keeps the graph free of shape-dependent branches (ONNX export with dynamic height/width)
        wh, ww = size if size is not None else (self.window, self.window)
        index = _relative_index(wh, ww, self.window, x.device)
        bias = self.rel_bias[index.view(-1)].view(n, n, self.heads).permute(2, 0, 1)  # (heads, N, N)
        bias = bias.unsqueeze(0).to(q.dtype)
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias + mask.unsqueeze(1).to(q.dtype)).repeat(bw // nw, 1, 1, 1)  # window order is (B, nW)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


def _windows(x: Tensor, wh: int, ww: int) -> Tensor:
    """(B, H, W, ...) -> (B*nW, wh*ww, ...) with windows ordered (B, row, col)."""
    b, h, wd = x.shape[:3]
    rest = x.shape[3:]
    x = x.reshape(b, h // wh, wh, wd // ww, ww, *rest).transpose(2, 3)
    return x.reshape(b * (h // wh) * (wd // ww), wh * ww, *rest)


def _unwindows(x: Tensor, wh: int, ww: int, b: int, h: int, wd: int) -> Tensor:
    rest = x.shape[2:]
    x = x.reshape(b, h // wh, wd // ww, wh, ww, *rest).transpose(2, 3)
    return x.reshape(b, h, wd, *rest)


def _shift_regions(n: int, win: int, shift: int, device: torch.device) -> Tensor:
    """Swin's region labels along one rolled axis: the last window joins tokens rolled in from the start (2) with
    the others (1); they must not attend to each other. Without a shift every window holds one label (the last
    window 1, the others 0; ``n`` is a multiple of ``win``), so the mask is empty: no branch on ``shift``."""
    idx = torch.arange(n, device=device)
    return (idx >= n - win).float() + (idx >= n - shift).float()


def _roll(x: Tensor, shifts: Sequence[int], dims: Sequence[int]) -> Tensor:
    """``torch.roll`` by shifts in [-size, size] as gathers along each dim (the same values): ONNX export takes a
    roll only by constant shifts, and the shift here depends on the map's size (0 along a side no longer than the
    window). The wrap-around is two `where`s: a remainder by a size-dependent number does not export either."""
    for shift, dim in zip(shifts, dims):
        n = x.shape[dim]
        idx = torch.arange(n, device=x.device) - shift
        idx = torch.where(idx < 0, idx + n, torch.where(idx >= n, idx - n, idx))
        x = x.index_select(dim, idx)
    return x


class WindowBlock(nn.Module):
    """Pre-norm Transformer block with (shifted) window attention on a (B, h, w, C) map."""

    def __init__(
        self,
        dim: int,
        heads: int,
        window: int,
        shift: int = 0,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        mask_padding: bool = True,
    ) -> None:
        super().__init__()
        if not 0 <= shift < window:
            raise ValueError(f"WindowBlock: shift={shift} must be in [0, window={window})")
        self.window, self.shift, self.mask_padding = window, shift, mask_padding
        self.pad_value = 0.0  # tests change it to check that padding never leaks into real positions
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _mask(
        self,
        hp: int,
        wp: int,
        h: int,
        w: int,
        win: tuple[int, int],
        shift: tuple[int, int],
        device: torch.device,
    ) -> Tensor:
        """Additive (nW, N, N) mask: shifted-window regions (Swin) and padded keys. All zeros where there is
        neither, and computed anyway: one graph for every input size (adding zeros leaves the bias as it was)."""
        (wh, ww), (sh, sw) = win, shift
        region = _shift_regions(hp, wh, sh, device)[:, None] * 3 + _shift_regions(wp, ww, sw, device)[None, :]
        rw = _windows(region[None, ..., None], wh, ww)[..., 0]  # (nW, N) region label per token
        mask = (rw[:, :, None] != rw[:, None, :]).float() * MASK_VALUE
        if self.mask_padding:  # a setting of the module, not of the input
            rows = torch.arange(hp, device=device) >= h
            cols = torch.arange(wp, device=device) >= w
            pad = _roll((rows[:, None] | cols[None, :]).float(), (-sh, -sw), (0, 1))
            pw = _windows(pad[None, ..., None], wh, ww)[..., 0]  # (nW, N): 1 at padded tokens
            mask = mask + pw[:, None, :] * MASK_VALUE
        return mask

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        ws = self.window
        shortcut = x
        x = self.norm1(x)
        # Swin's rule per axis: along a side no longer than the window, the window is the side and is not shifted.
        # No Python branch on the map's size (sym_min and arithmetic; padding and rolls by 0 are no-ops), so that
        # torch.export / ONNX keep height and width dynamic instead of specialising to the traced size.
        wh, ww = torch.sym_min(h, ws), torch.sym_min(w, ws)
        sh = torch.sym_min(self.shift, (h - wh) * self.shift)  # = shift if h > ws else 0
        sw = torch.sym_min(self.shift, (w - ww) * self.shift)
        ph, pw = (-h) % wh, (-w) % ww
        x = F.pad(x, (0, 0, 0, pw, 0, ph), value=self.pad_value)
        hp, wp = h + ph, w + pw
        x = _roll(x, (-sh, -sw), (1, 2))
        mask = self._mask(hp, wp, h, w, (wh, ww), (sh, sw), x.device)
        x = _unwindows(self.attn(_windows(x, wh, ww), mask, size=(wh, ww)), wh, ww, b, hp, wp)
        x = _roll(x, (sh, sw), (1, 2))[:, :h, :w]
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MultiAtrous(nn.Module):
    """DOLG's multi-atrous block: 1x1 and dilated 3x3 convs + image pooling (1x1 conv, ReLU), concatenated,
    1x1, ReLU. As DOLG's release (ASPP in core/model/dolg_model.py), except that the pooled branch comes last in
    the concatenation here (a permutation of `fuse`'s input channels)."""

    def __init__(
        self, in_dim: int, out_dim: int, branch_dim: int = 512, rates: Sequence[int] = (6, 12, 18)
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [nn.Conv2d(in_dim, branch_dim, 1)]
            + [nn.Conv2d(in_dim, branch_dim, 3, padding=r, dilation=r) for r in rates]
        )
        self.pool_conv = nn.Conv2d(in_dim, branch_dim, 1)
        self.fuse = nn.Conv2d(branch_dim * (len(rates) + 2), out_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        feats = [br(x) for br in self.branches]
        pooled = F.relu(self.pool_conv(x.mean(dim=(2, 3), keepdim=True))).expand(-1, -1, *x.shape[2:])
        return F.relu(self.fuse(torch.cat(feats + [pooled], dim=1)))


class SpatialAttention(nn.Module):
    """DELF/DOLG spatial attention: f = BN(conv1x1(x)); L = softplus(conv1x1(relu(f))) * f / ||f||."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, dim, 1)
        self.bn = nn.BatchNorm2d(dim)
        self.score = nn.Conv2d(dim, 1, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.bn(self.conv(x))
        att = F.softplus(self.score(F.relu(f)))  # (B, 1, h, w)
        return att * F.normalize(f, p=2, dim=1), att


class LocalBranch(nn.Module):
    """Local branch returning the attended local map L (B, out_dim, h, w) and the attention map (B, 1, h, w).

    context="window": 1x1 projection to `dim`, `blocks` window-attention blocks (odd blocks shifted by
    window//2 when `shift`), spatial attention.  context="atrous": DOLG multi-atrous block to `dim`, spatial
    attention.  context="none": projection and spatial attention only (ablation).
    """

    def __init__(
        self,
        in_dim: int,
        dim: int = 512,
        context: str = "window",
        window: int = 7,
        blocks: int = 2,
        heads: int = 8,
        shift: bool = True,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        atrous_rates: Sequence[int] = (6, 12, 18),
        atrous_dim: int = 512,
        mask_padding: bool = True,
    ) -> None:
        super().__init__()
        if context not in ("window", "atrous", "none"):
            raise ValueError(f"LocalBranch: context must be window, atrous or none, got {context!r}")
        self.context = context
        self.out_dim = dim
        if context == "atrous":
            self.proj = MultiAtrous(in_dim, dim, branch_dim=atrous_dim, rates=tuple(atrous_rates))
        else:
            self.proj = nn.Conv2d(in_dim, dim, 1)
        n_blocks = blocks if context == "window" else 0
        if n_blocks and window < 1:
            raise ValueError(f"LocalBranch: window must be >= 1, got {window}")
        self.window_blocks = nn.ModuleList(
            [
                WindowBlock(
                    dim,
                    heads,
                    window,
                    shift=(window // 2 if shift and i % 2 else 0),
                    mlp_ratio=mlp_ratio,
                    drop_path=drop_path,
                    mask_padding=mask_padding,
                )
                for i in range(n_blocks)
            ]
        )
        self.attention = SpatialAttention(dim, dim)

    def forward(self, local: Tensor) -> tuple[Tensor, Tensor]:
        x = self.proj(local)
        if len(self.window_blocks):
            x = x.permute(0, 2, 3, 1)
            for blk in self.window_blocks:
                x = blk(x)
            x = x.permute(0, 3, 1, 2).contiguous()
        return self.attention(x)
