"""Fusions of the global vector g and the local map L: one interface, six variants (dalg.md table).

Every fusion returns `FusionOutput.fused`, the vector before the final Linear to the descriptor (that Linear
lives in the DALG composer so that all variants share it). `uses_global` / `uses_local` are class attributes,
so the composer can skip building a branch before the fusion exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.layers import Mlp
from torch import Tensor, nn


@dataclass
class FusionOutput:
    fused: Tensor  # (B, out_dim)
    attention: Tensor | None  # (B, heads, n_queries, n_keys) cross-attention weights, or None


class Fusion(nn.Module):
    """Base class: `forward(g, local, deep=None) -> FusionOutput`."""

    uses_global: bool = True
    uses_local: bool = True

    def __init__(self, global_dim: int, local_dim: int, deep_dim: int | None = None) -> None:
        super().__init__()
        if self.uses_global and global_dim <= 0:
            raise ValueError(f"{type(self).__name__} needs a global branch (global_dim={global_dim})")
        if self.uses_local and local_dim <= 0:
            raise ValueError(f"{type(self).__name__} needs a local branch (local_dim={local_dim})")
        self.global_dim, self.local_dim, self.deep_dim = global_dim, local_dim, deep_dim
        self.out_dim = 0

    def forward(self, g: Tensor | None, local: Tensor | None, deep: Tensor | None = None) -> FusionOutput:
        raise NotImplementedError


def fourier_pos_2d(h: int, w: int, n_freq: int, device: torch.device) -> Tensor:
    """(h*w, 4*n_freq) float32 features sin/cos(pi 2^k u), k < n_freq, of the normalised token-centre coordinates
    u = ((i + 0.5) / h, (j + 0.5) / w): a point of the image gets the same features at every grid size. The
    highest frequency has a period of 2^(2 - n_freq) of the side (1/4 for 4), resolvable on an 8-token side."""
    omega = math.pi * 2.0 ** torch.arange(n_freq, device=device, dtype=torch.float32)
    ys, xs = torch.meshgrid(
        (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h,
        (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w,
        indexing="ij",
    )
    ys, xs = ys.reshape(-1, 1) * omega, xs.reshape(-1, 1) * omega
    return torch.cat([ys.sin(), ys.cos(), xs.sin(), xs.cos()], dim=1)


class CrossAttention(nn.Module):
    """Multi-head attention that also returns its weights (B, heads, n_q, n_k)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"CrossAttention: dim={dim} not divisible by heads={heads}")
        self.heads = heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(
        self,
        q: Tensor,
        kv: Tensor,
        q_pos: Tensor | None = None,
        k_pos: Tensor | None = None,
        k_bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """q_pos / k_pos ((n_q | n_k, dim)) are added to the projected queries / keys only, never to the values;
        k_bias (n_k,) is added to every query's logits."""
        b, nq, c = q.shape
        d = c // self.heads

        def split(t: Tensor) -> Tensor:
            return t.reshape(b, t.shape[1], self.heads, d).transpose(1, 2)

        qp, kp = self.q(q), self.k(kv)
        qh = split(qp if q_pos is None else qp + q_pos.to(qp.dtype))
        kh = split(kp if k_pos is None else kp + k_pos.to(kp.dtype))
        vh = split(self.v(kv))
        logits = qh @ kh.transpose(-2, -1) / math.sqrt(d)
        attn = torch.softmax(logits if k_bias is None else logits + k_bias.to(logits.dtype), dim=-1)
        out = (attn @ vh).transpose(1, 2).reshape(b, nq, c)
        return self.proj(out), attn


class CrossAttentionFusion(Fusion):
    """DALG: a pre-norm Transformer decoder block between g and the local tokens; fused = [g ; z].

    direction="global_to_local" (default, dalg.md): one query (g projected to local_dim) attends over the h*w
    local tokens; z is the updated query.  attention: (B, heads, 1, h*w).
    direction="local_to_global": the h*w local tokens query [g ; deep-map tokens] (the global side as a token
    set, so that the softmax is not over a single key); z is the mean of the updated local tokens.
    attention: (B, heads, h*w, 1 + h2*w2).

    Position (pos_encoding): a learnt linear map of `fourier_pos_2d` features of normalised coordinates, added
    to the projected keys (and local queries) only. Position then steers where attention goes, but what is
    gathered (values, residual) is content alone, and the encoding is a function of the place in the image, not
    of the token index, so that a smooth map gives the same result at 16x16 and 32x32 tokens (tested). The old
    fixed sin-cos code of integer indices (norm ~16 against ~0.7 for local tokens) added to keys and values
    swamped the content (zeroing it moved the update by ~4%) and changed with the grid (cosine 0.94).
    local_to_global: the g key's logit gets + log(h2*w2), so that g weighs against the deep tokens' mean, not
    their sum, independently of their number.
    """

    def __init__(
        self,
        global_dim: int,
        local_dim: int,
        deep_dim: int | None = None,
        heads: int = 8,
        direction: str = "global_to_local",
        mlp_ratio: float = 4.0,
        pos_encoding: bool = True,
        pos_frequencies: int = 4,
    ) -> None:
        super().__init__(global_dim, local_dim, deep_dim)
        if direction not in ("global_to_local", "local_to_global"):
            raise ValueError(
                f"CrossAttentionFusion: direction must be global_to_local or local_to_global, "
                f"got {direction!r}"
            )
        if direction == "local_to_global" and not deep_dim:
            raise ValueError(
                "CrossAttentionFusion(direction=local_to_global) needs deep_dim (the deep map width)"
            )
        if pos_encoding and pos_frequencies < 1:
            raise ValueError(f"CrossAttentionFusion: pos_frequencies must be >= 1, got {pos_frequencies}")
        self.direction, self.pos_encoding, self.pos_frequencies = direction, pos_encoding, pos_frequencies
        n_feat = 4 * pos_frequencies
        self.key_pos = nn.Linear(n_feat, local_dim, bias=False) if pos_encoding else None
        self.query_pos = (
            nn.Linear(n_feat, local_dim, bias=False)
            if pos_encoding and direction == "local_to_global"
            else None
        )
        self.g_proj = nn.Linear(global_dim, local_dim)
        self.deep_proj = nn.Linear(deep_dim, local_dim) if direction == "local_to_global" else None
        self.norm_q, self.norm_kv, self.norm_mlp = (
            nn.LayerNorm(local_dim),
            nn.LayerNorm(local_dim),
            nn.LayerNorm(local_dim),
        )
        self.attn = CrossAttention(local_dim, heads)
        self.mlp = Mlp(local_dim, int(local_dim * mlp_ratio))
        self.out_dim = global_dim + local_dim

    def _pos(self, proj: nn.Linear | None, m: Tensor) -> Tensor | None:
        """(h*w, Dl) learnt position term of the map m's token grid, or None without position encoding."""
        if proj is None:
            return None
        feats = fourier_pos_2d(m.shape[2], m.shape[3], self.pos_frequencies, m.device)
        return proj(feats.to(proj.weight.dtype))

    def forward(self, g: Tensor | None, local: Tensor | None, deep: Tensor | None = None) -> FusionOutput:
        assert g is not None and local is not None
        gq = self.g_proj(g).unsqueeze(1)  # (B, 1, Dl)
        lt = local.flatten(2).transpose(1, 2)  # (B, h*w, Dl)
        if self.direction == "global_to_local":
            q, kv, q_pos, k_pos, k_bias = gq, lt, None, self._pos(self.key_pos, local), None
        else:
            if deep is None:
                raise ValueError("CrossAttentionFusion(direction=local_to_global) needs the deep map")
            dt = self.deep_proj(deep.flatten(2).transpose(1, 2))
            q, kv = lt, torch.cat([gq, dt], dim=1)
            q_pos, k_pos = self._pos(self.query_pos, local), self._pos(self.key_pos, deep)
            if k_pos is not None:  # g has no place in the image
                k_pos = torch.cat([k_pos.new_zeros(1, k_pos.shape[1]), k_pos])
            k_bias = torch.zeros(kv.shape[1], device=kv.device)
            k_bias[0] = math.log(dt.shape[1])
        upd, attn = self.attn(self.norm_q(q), self.norm_kv(kv), q_pos, k_pos, k_bias)
        z = q + upd
        z = z + self.mlp(self.norm_mlp(z))
        return FusionOutput(torch.cat([g, z.mean(dim=1)], dim=1), attn)


class OrthogonalFusion(Fusion):
    """DOLG: per position, the part of the local vector orthogonal to g; average-pooled; concatenated with g.

    When the local width differs from g's (DALG heuristic on a ViT), g is first projected linearly to the local
    width for the projection step (DOLG has both at 1024 and no projection).
    """

    def __init__(self, global_dim: int, local_dim: int, deep_dim: int | None = None) -> None:
        super().__init__(global_dim, local_dim, deep_dim)
        self.g_proj = nn.Identity() if global_dim == local_dim else nn.Linear(global_dim, local_dim)
        self.out_dim = global_dim + local_dim

    def orthogonal_component(self, g: Tensor, local: Tensor) -> Tensor:
        """(B, Dl, h, w): l - (g.l / ||g||^2) g at every position."""
        gp = self.g_proj(g)
        dot = torch.einsum("bc,bchw->bhw", gp, local).unsqueeze(1)
        norm2 = gp.pow(2).sum(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
        return local - dot / norm2 * gp[:, :, None, None]

    def forward(self, g: Tensor | None, local: Tensor | None, deep: Tensor | None = None) -> FusionOutput:
        assert g is not None and local is not None
        orth = self.orthogonal_component(g, local).mean(dim=(2, 3))
        return FusionOutput(torch.cat([g, orth], dim=1), None)


class ConcatFusion(Fusion):
    """Average-pooled local ⊕ g."""

    def __init__(self, global_dim: int, local_dim: int, deep_dim: int | None = None) -> None:
        super().__init__(global_dim, local_dim, deep_dim)
        self.out_dim = global_dim + local_dim

    def forward(self, g: Tensor | None, local: Tensor | None, deep: Tensor | None = None) -> FusionOutput:
        assert g is not None and local is not None
        return FusionOutput(torch.cat([g, local.mean(dim=(2, 3))], dim=1), None)


class HadamardFusion(Fusion):
    """Average-pooled local ⊙ (g projected to the local width)."""

    def __init__(self, global_dim: int, local_dim: int, deep_dim: int | None = None) -> None:
        super().__init__(global_dim, local_dim, deep_dim)
        self.g_proj = nn.Linear(global_dim, local_dim)
        self.out_dim = local_dim

    def forward(self, g: Tensor | None, local: Tensor | None, deep: Tensor | None = None) -> FusionOutput:
        assert g is not None and local is not None
        return FusionOutput(local.mean(dim=(2, 3)) * self.g_proj(g), None)


class GlobalOnlyFusion(Fusion):
    """g alone (no local branch is built)."""

    uses_local = False

    def __init__(self, global_dim: int, local_dim: int = 0, deep_dim: int | None = None) -> None:
        super().__init__(global_dim, local_dim, deep_dim)
        self.out_dim = global_dim

    def forward(self, g: Tensor | None, local: Tensor | None, deep: Tensor | None = None) -> FusionOutput:
        assert g is not None
        return FusionOutput(g, None)


class LocalOnlyFusion(Fusion):
    """Average-pooled local map alone (no global branch is built)."""

    uses_global = False

    def __init__(self, global_dim: int = 0, local_dim: int = 0, deep_dim: int | None = None) -> None:
        super().__init__(global_dim, local_dim, deep_dim)
        self.out_dim = local_dim

    def forward(self, g: Tensor | None, local: Tensor | None, deep: Tensor | None = None) -> FusionOutput:
        assert local is not None
        return FusionOutput(local.mean(dim=(2, 3)), None)
