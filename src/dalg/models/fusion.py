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


def sincos_pos_2d(h: int, w: int, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Fixed 2-D sine-cosine position encoding on the token grid, (h*w, dim); dim must be a multiple of 4."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position encoding needs dim % 4 == 0, got {dim}")
    q = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(q, device=device, dtype=torch.float32) / q))
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    ys, xs = ys.reshape(-1, 1) * omega, xs.reshape(-1, 1) * omega
    return torch.cat([ys.sin(), ys.cos(), xs.sin(), xs.cos()], dim=1).to(dtype)


class CrossAttention(nn.Module):
    """Multi-head attention that also returns its weights (B, heads, n_q, n_k)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"CrossAttention: dim={dim} not divisible by heads={heads}")
        self.heads = heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, q: Tensor, kv: Tensor) -> tuple[Tensor, Tensor]:
        b, nq, c = q.shape
        d = c // self.heads

        def split(t: Tensor) -> Tensor:
            return t.reshape(b, t.shape[1], self.heads, d).transpose(1, 2)

        qh, kh, vh = split(self.q(q)), split(self.k(kv)), split(self.v(kv))
        attn = torch.softmax(qh @ kh.transpose(-2, -1) / math.sqrt(d), dim=-1)
        out = (attn @ vh).transpose(1, 2).reshape(b, nq, c)
        return self.proj(out), attn


class CrossAttentionFusion(Fusion):
    """DALG: a pre-norm Transformer decoder block between g and the local tokens; fused = [g ; z].

    direction="global_to_local" (default, dalg.md): one query (g projected to local_dim) attends over the h*w
    local tokens (+ 2-D position encoding); z is the updated query.  attention: (B, heads, 1, h*w).
    direction="local_to_global": the h*w local tokens query [g ; deep-map tokens] (the global side as a token
    set, so that the softmax is not over a single key); z is the mean of the updated local tokens.
    attention: (B, heads, h*w, 1 + h2*w2).
    """

    def __init__(self, global_dim: int, local_dim: int, deep_dim: int | None = None, heads: int = 8,
                 direction: str = "global_to_local", mlp_ratio: float = 4.0, pos_encoding: bool = True) -> None:
        super().__init__(global_dim, local_dim, deep_dim)
        if direction not in ("global_to_local", "local_to_global"):
            raise ValueError(f"CrossAttentionFusion: direction must be global_to_local or local_to_global, "
                             f"got {direction!r}")
        if direction == "local_to_global" and not deep_dim:
            raise ValueError("CrossAttentionFusion(direction=local_to_global) needs deep_dim (the deep map width)")
        self.direction, self.pos_encoding = direction, pos_encoding
        self.g_proj = nn.Linear(global_dim, local_dim)
        self.deep_proj = nn.Linear(deep_dim, local_dim) if direction == "local_to_global" else None
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(local_dim), nn.LayerNorm(local_dim), \
            nn.LayerNorm(local_dim)
        self.attn = CrossAttention(local_dim, heads)
        self.mlp = Mlp(local_dim, int(local_dim * mlp_ratio))
        self.out_dim = global_dim + local_dim

    def _tokens(self, m: Tensor) -> Tensor:
        b, c, h, w = m.shape
        t = m.flatten(2).transpose(1, 2)
        return t + sincos_pos_2d(h, w, c, m.device, m.dtype) if self.pos_encoding else t

    def forward(self, g: Tensor | None, local: Tensor | None, deep: Tensor | None = None) -> FusionOutput:
        assert g is not None and local is not None
        gq = self.g_proj(g).unsqueeze(1)  # (B, 1, Dl)
        lt = self._tokens(local)  # (B, h*w, Dl)
        if self.direction == "global_to_local":
            q, kv = gq, lt
        else:
            if deep is None:
                raise ValueError("CrossAttentionFusion(direction=local_to_global) needs the deep map")
            dt = self.deep_proj(deep.flatten(2).transpose(1, 2))
            if self.pos_encoding:
                dt = dt + sincos_pos_2d(deep.shape[2], deep.shape[3], self.local_dim, deep.device, deep.dtype)
            q, kv = lt, torch.cat([gq, dt], dim=1)
        upd, attn = self.attn(self.norm_q(q), self.norm_kv(kv))
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

