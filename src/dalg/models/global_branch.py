"""Global branch: GeM pooling of the deep map (+ optional CLS token) and a linear projection (dalg.md)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al., TPAMI 2018): (mean x^p)^(1/p) over positions."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learn_p: bool = True) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM: p must be > 0, got {p}")
        self.eps = eps
        if learn_p:
            self.p = nn.Parameter(torch.tensor(float(p)))
        else:
            self.register_buffer("p", torch.tensor(float(p)))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, C). Negative activations (ViT tokens) are clamped to eps, as for ReLU maps."""
        p = self.p.float().clamp(min=1.0)  # keep a learnt p a proper mean (>= arithmetic mean)
        # in float32: eps**p underflows in half precision, and the 1/p root of 0 has an infinite gradient
        pooled = x.float().clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)
        return pooled.to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={float(self.p):.3f}, eps={self.eps}"


class GlobalBranch(nn.Module):
    """GeM over patch tokens [concatenated with the CLS token when use_cls] -> Linear -> g."""

    def __init__(self, in_dim: int, out_dim: int = 1024, p: float = 3.0, learn_p: bool = True,
                 use_cls: bool = False) -> None:
        super().__init__()
        self.pool = GeM(p=p, learn_p=learn_p)
        self.use_cls = use_cls
        self.out_dim = out_dim
        self.proj = nn.Linear(in_dim * (2 if use_cls else 1), out_dim)

    def forward(self, deep: Tensor, cls: Tensor | None) -> Tensor:
        pooled = self.pool(deep)
        if self.use_cls:
            if cls is None:
                raise ValueError("GlobalBranch(use_cls=True) needs a CLS token; this backbone gives none (CNN?)")
            pooled = torch.cat([pooled, cls], dim=1)
        return self.proj(pooled)

