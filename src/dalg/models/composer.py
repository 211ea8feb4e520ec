"""The composer for DALG and DOLG: backbone -> global / local branches -> fusion -> Linear -> L2 norm.

DOLG is the same composer with a ResNetBackbone, a multi-atrous LocalBranch and OrthogonalFusion.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalg.models.fusion import Fusion
from dalg.models.heads import MarginHead
from dalg.models.multiscale import ScaleResize, check_scales, effective_scales, multiscale_descriptor
from dalg.utils.input_config import InputConfig


def _fusion_class(factory: Callable[..., Fusion]) -> type:
    """The Fusion class behind a class or a functools.partial of one (Hydra `_partial_: true`)."""
    cls = getattr(factory, "func", factory)
    if not (isinstance(cls, type) and issubclass(cls, Fusion)):
        raise TypeError(f"DALG: fusion must be a Fusion subclass or a partial of one, got {factory!r}")
    return cls


class DALG(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        global_branch: Callable[..., nn.Module] | None,
        local_branch: Callable[..., nn.Module] | None,
        fusion: Callable[..., Fusion],
        head: Callable[..., MarginHead] | None = None,
        num_classes: int = 0,
        embed_dim: int = 512,
        scales: Sequence[float] = (1.0,),
        scale_resize: Mapping[str, Any] | ScaleResize | None = None,
    ) -> None:
        super().__init__()
        fusion_cls = _fusion_class(fusion)
        self.backbone = backbone
        self.stride = int(backbone.stride)
        self.embed_dim = int(embed_dim)
        self.scales = check_scales(scales, "DALG")
        self.scale_resize = ScaleResize.from_mapping(scale_resize)  # how extract() resizes for each scale
        # mean/std/interpolation/size multiple its inputs need; a rebuilt trained network gets its checkpoint's
        self.input_config: InputConfig = getattr(backbone, "input_config", None) or InputConfig(
            size_multiple=self.stride, source="backbone without an input config: ImageNet defaults"
        )
        if fusion_cls.uses_global and global_branch is None:
            raise ValueError(f"DALG: {fusion_cls.__name__} needs a global_branch")
        if fusion_cls.uses_local and local_branch is None:
            raise ValueError(f"DALG: {fusion_cls.__name__} needs a local_branch")
        self.global_branch = global_branch(in_dim=backbone.deep_dim) if fusion_cls.uses_global else None
        self.local_branch = local_branch(in_dim=backbone.local_dim) if fusion_cls.uses_local else None
        self.fusion = fusion(
            global_dim=self.global_branch.out_dim if self.global_branch is not None else 0,
            local_dim=self.local_branch.out_dim if self.local_branch is not None else 0,
            deep_dim=backbone.deep_dim,
        )
        self.descriptor = nn.Linear(self.fusion.out_dim, self.embed_dim)
        self.head = (
            head(embed_dim=self.embed_dim, num_classes=num_classes) if head and num_classes > 0 else None
        )

    def forward_features(self, x: Tensor) -> dict[str, Tensor | None]:
        """All intermediate outputs; `descriptor` is L2-normalised, (B, embed_dim)."""
        out = self.backbone(x)
        g = self.global_branch(out.deep, out.cls) if self.global_branch is not None else None
        local, att = self.local_branch(out.local) if self.local_branch is not None else (None, None)
        fused = self.fusion(g, local, deep=out.deep)
        desc = F.normalize(self.descriptor(fused.fused), p=2, dim=-1)
        return {
            "descriptor": desc,
            "global": g,
            "local": local,
            "spatial_attention": att,
            "fusion_attention": fused.attention,
        }

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)["descriptor"]

    @torch.no_grad()
    def extract(self, x: Tensor, scales: Sequence[float] | None = None) -> Tensor:
        """Descriptor averaged over image scales (DOLG's protocol) and L2-normalised; one scale = forward.
        Each scale is resized by ``self.scale_resize`` to sides that are multiples of the input size multiple."""
        return multiscale_descriptor(
            self.forward,
            x,
            effective_scales(scales, self),
            self.scale_resize,
            self.input_config.size_multiple,
        )
