"""Global branch: pooling of the deep map (+ optional CLS token) and a linear projection (dalg.md).

Poolings (`pooling`, conf/model/global_branch/*.yaml):
- gem: GeM on the map itself. For CNNs, whose stage-4 maps are ReLU outputs (>= 0). On ViT tokens (the final
  LayerNorm's output, ~half negative) it clamps the negative half to eps, where it has no gradient.
- gem_proj: a learnt 1x1 projection + softplus (or ReLU), then GeM: GeM's positivity without discarding the
  negative half of a token's coordinates, and with a gradient to all of them (softplus).
- mean: the mean token.
- cls: the CLS token alone (a backbone with a CLS token).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

POOLINGS = ("gem", "gem_proj", "mean", "cls")
ACTIVATIONS = {"softplus": nn.Softplus, "relu": nn.ReLU}


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al., TPAMI 2018): (mean x^p)^(1/p) over positions."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learn_p: bool = True) -> None:
        super().__init__()
        if p < 1:
            raise ValueError(f"GeM: p must be >= 1 (a mean at least the arithmetic mean), got {p}")
        self.eps = eps
        if learn_p:
            self.p = nn.Parameter(torch.tensor(float(p)))
        else:
            self.register_buffer("p", torch.tensor(float(p)))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, C). Values below eps (negative ViT coordinates) count as eps, as for ReLU maps."""
        p = self.p.float()
        # p is used at >= 1 (a proper mean), but its gradient passes the clamp (straight-through): a learnt p
        # that drifted below 1 would otherwise get no gradient and stay stuck at the arithmetic mean
        p = p + (p.clamp(min=1.0) - p).detach()
        # in float32: eps**p underflows in half precision, and the 1/p root of 0 has an infinite gradient
        pooled = x.float().clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)
        return pooled.to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={float(self.p):.3f}, eps={self.eps}"


class GlobalBranch(nn.Module):
    """Pooling (gem | gem_proj | mean | cls) of the deep map [concatenated with the CLS token when use_cls]
    -> Linear -> g."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 1024,
        p: float = 3.0,
        learn_p: bool = True,
        use_cls: bool = False,
        pooling: str = "gem",
        proj_act: str = "softplus",
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"GlobalBranch: pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if pooling == "cls" and use_cls:
            raise ValueError("GlobalBranch: pooling=cls with use_cls=true would use the CLS token twice")
        if proj_act not in ACTIVATIONS:
            raise ValueError(
                f"GlobalBranch: proj_act must be one of {', '.join(ACTIVATIONS)}, got {proj_act!r}"
            )
        self.pooling, self.use_cls, self.out_dim = pooling, use_cls, out_dim
        self.pre = (
            nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), ACTIVATIONS[proj_act]())
            if pooling == "gem_proj"
            else None
        )
        self.pool = GeM(p=p, learn_p=learn_p) if pooling in ("gem", "gem_proj") else None
        self.proj = nn.Linear(in_dim * (2 if use_cls else 1), out_dim)

    def _cls(self, cls: Tensor | None) -> Tensor:
        if cls is None:
            raise ValueError(
                f"GlobalBranch(pooling={self.pooling}, use_cls={self.use_cls}) needs a CLS token; "
                "this backbone gives none (CNN?)"
            )
        return cls

    def pooled(self, deep: Tensor, cls: Tensor | None) -> Tensor:
        """(B, C) pooled deep map, before the CLS concatenation and the projection."""
        if self.pooling == "cls":
            return self._cls(cls)
        if self.pooling == "mean":
            return deep.mean(dim=(-2, -1))
        return self.pool(deep if self.pre is None else self.pre(deep))

    def forward(self, deep: Tensor, cls: Tensor | None) -> Tensor:
        pooled = self.pooled(deep, cls)
        if self.use_cls:
            pooled = torch.cat([pooled, self._cls(cls)], dim=1)
        return self.proj(pooled)
