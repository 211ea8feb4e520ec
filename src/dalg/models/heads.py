"""Margin softmax heads on L2-normalised embeddings: ArcFace, CosFace, CurricularFace, Sub-center ArcFace.

All return scaled float32 logits (B, num_classes) for a cross-entropy loss; the margin is applied to the target
class only, and only when labels are given (without labels: `scale * cos`). The cosines and margins are computed in
float32 with autocast off: in bf16 a cosine carries ~3 significant digits, i.e. errors up to ~0.2 logits at s=30,
as large as the margin's own effect.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


class MarginHead(nn.Module):
    """Base: cosine logits against L2-normalised class weights; subclasses define `margin_logits`."""

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        scale: float = 30.0,
        margin: float = 0.15,
        centers_per_class: int = 1,
    ) -> None:
        super().__init__()
        if num_classes <= 0 or embed_dim <= 0:
            raise ValueError(
                f"{type(self).__name__}: need num_classes > 0 and embed_dim > 0, "
                f"got {num_classes}, {embed_dim}"
            )
        self.embed_dim, self.num_classes, self.k = embed_dim, num_classes, centers_per_class
        self.scale, self.margin = float(scale), float(margin)
        self.weight = nn.Parameter(torch.empty(num_classes * centers_per_class, embed_dim))
        nn.init.xavier_uniform_(self.weight)

    def cosine(self, emb: Tensor) -> Tensor:
        """float32 cosines (B, num_classes); call with autocast off (forward does)."""
        cos = F.linear(F.normalize(emb.float(), dim=-1), F.normalize(self.weight.float(), dim=-1))
        if self.k > 1:  # sub-centres: the nearest centre of each class
            cos = cos.view(-1, self.num_classes, self.k).amax(dim=-1)
        return cos.clamp(-1.0, 1.0)

    def margin_logits(self, cos: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, emb: Tensor, labels: Tensor | None = None) -> Tensor:
        if labels is not None and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"{type(self).__name__}: labels must lie in [0, {self.num_classes}), "
                f"got [{int(labels.min())}, {int(labels.max())}]"
            )
        with torch.autocast(device_type=emb.device.type, enabled=False):
            cos = self.cosine(emb)
            return self.scale * (cos if labels is None else self.margin_logits(cos, labels))

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_classes={self.num_classes}, k={self.k}, "
            f"scale={self.scale}, margin={self.margin}"
        )


def _additive_angular(cos_y: Tensor, m: float) -> Tensor:
    """cos(theta + m), continued as cos(theta) - m*sin(m) once theta + m > pi (insightface's rule), so the
    target logit keeps decreasing with theta instead of wrapping back up."""
    sin_y = (1.0 - cos_y.pow(2)).clamp(min=1e-12).sqrt()
    phi = cos_y * math.cos(m) - sin_y * math.sin(m)
    return torch.where(cos_y > math.cos(math.pi - m), phi, cos_y - m * math.sin(m))


class ArcFace(MarginHead):
    """Deng et al., CVPR 2019: target logit s*cos(theta_y + m)."""

    def margin_logits(self, cos: Tensor, labels: Tensor) -> Tensor:
        cos_y = cos.gather(1, labels[:, None])
        return cos.scatter(1, labels[:, None], _additive_angular(cos_y, self.margin))


class CosFace(MarginHead):
    """Wang et al., CVPR 2018: target logit s*(cos(theta_y) - m)."""

    def margin_logits(self, cos: Tensor, labels: Tensor) -> Tensor:
        cos_y = cos.gather(1, labels[:, None])
        return cos.scatter(1, labels[:, None], cos_y - self.margin)


def _global_mean(x: Tensor) -> Tensor:
    """Mean of x over all processes' elements (sum and count all-reduced, so unequal batches weigh by size)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x.mean()
    sums = torch.stack([x.sum(), torch.tensor(float(x.numel()), device=x.device, dtype=x.dtype)])
    dist.all_reduce(sums)
    return sums[0] / sums[1]


class CurricularFace(MarginHead):
    """Huang et al., CVPR 2020: ArcFace target; a non-target cos_j above cos(theta_y + m) becomes
    cos_j * (t + cos_j), with t an EMA (momentum 0.01) of the mean target cosine, updated in training (before
    use, as the paper and DOLG's release). Under torch.distributed the mean is over all processes' batches, so that
    every process keeps the same t (otherwise each drifts with its own batches and DDP replicas diverge)."""

    def __init__(
        self, embed_dim: int, num_classes: int, momentum: float = 0.01, **scale_margin: float
    ) -> None:
        super().__init__(embed_dim, num_classes, **scale_margin)  # scale, margin: as the base's
        self.momentum = momentum
        self.register_buffer("t", torch.zeros(()))

    def margin_logits(self, cos: Tensor, labels: Tensor) -> Tensor:
        cos_y = cos.gather(1, labels[:, None])
        phi = _additive_angular(cos_y, self.margin)
        cos_theta_m = cos_y * math.cos(self.margin) - (1.0 - cos_y.pow(2)).clamp(min=1e-12).sqrt() * math.sin(
            self.margin
        )
        if self.training:
            with torch.no_grad():
                self.t.mul_(1 - self.momentum).add_(self.momentum * _global_mean(cos_y))
        hard = cos > cos_theta_m
        out = torch.where(hard, cos * (self.t + cos), cos)
        return out.scatter(1, labels[:, None], phi)


class SubCenterArcFace(ArcFace):
    """Deng et al., ECCV 2020: k centres per class, cos = max over a class's centres, then ArcFace."""

    def __init__(
        self, embed_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.15, k: int = 3
    ) -> None:
        super().__init__(embed_dim, num_classes, scale, margin, centers_per_class=k)
