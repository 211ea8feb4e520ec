"""Backbone adapters: a timm ViT/DeiT or a timm ResNet, exposing an intermediate map and a deep map.

Both adapters return the same `BackboneOutput`, so the DALG composer never needs to know which one it holds:
- ViT: `local` = patch tokens after block `local_block` (dalg.md: L_local, assumed 2/3 of the depth),
  `deep` = patch tokens after the last block and the final norm, `cls` = the CLS token after the final norm.
- ResNet (DOLG): `local` = stage 3 (1024 ch, stride 16), `deep` = stage 4 (2048 ch, stride 32), `cls` = None.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from dalg.models.checkpoint import load_backbone_checkpoint
from dalg.models.pretrained import pretrained_kwargs
from dalg.utils.atomic import atomic_replace
from dalg.utils.input_config import resolve_input_config


@dataclass
class BackboneOutput:
    local: Tensor  # (B, local_dim, h, w)
    deep: Tensor  # (B, deep_dim, h2, w2)
    cls: Tensor | None  # (B, deep_dim) or None


class ViTBackbone(nn.Module):
    """Any timm ViT/DeiT, any input size (position embeddings interpolated, input padded to the patch size)."""

    def __init__(
        self,
        name: str = "vit_small_patch16_224",
        local_block: int | None = None,
        pretrained: bool = False,
        checkpoint: str | None = None,
        drop_path_rate: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str | None = None,
        **model_kwargs,
    ) -> None:
        super().__init__()
        self.vit = timm.create_model(
            name,
            **pretrained_kwargs(name, pretrained, checkpoint),  # a checkpoint wins over pretrained=true
            num_classes=0,
            drop_path_rate=drop_path_rate,
            dynamic_img_size=True,
            dynamic_img_pad=True,
            **model_kwargs,
        )
        if not hasattr(self.vit, "blocks") or not hasattr(self.vit, "patch_embed"):
            raise ValueError(
                f"ViTBackbone: timm model {name!r} is not a plain ViT (no .blocks / .patch_embed)"
            )
        depth = len(self.vit.blocks)
        if local_block is None:
            local_block = round(2 / 3 * depth) - 1  # assumed (dalg.md): 2/3 of the depth, e.g. block 8 of 12
        if local_block < 0:
            local_block += depth
        if not 0 <= local_block < depth:
            raise ValueError(f"ViTBackbone: local_block={local_block} outside 0..{depth - 1} for {name!r}")
        self.local_block = local_block
        self.local_dim = self.deep_dim = int(self.vit.embed_dim)
        patch = self.vit.patch_embed.patch_size
        self.stride = int(patch[0])
        self.num_prefix_tokens = int(self.vit.num_prefix_tokens)
        self.has_cls = getattr(self.vit, "cls_token", None) is not None
        # inputs resized to patch multiples at test time: timm's zero padding never happens (input_config.py)
        self.input_config = resolve_input_config(self.vit, self.stride, mean, std, interpolation)
        if checkpoint:
            load_backbone_checkpoint(self.vit, checkpoint)

    @property
    def num_layers(self) -> int:
        """Depth for layer-wise lr decay: embeddings = 0, block i = i + 1, final norm = depth + 1."""
        return len(self.vit.blocks) + 2

    def layer_id(self, name: str) -> int:
        """Layer index of a parameter name relative to this module (e.g. 'vit.blocks.3.attn.qkv.weight' -> 4)."""
        name = name.removeprefix("vit.")
        if name.startswith(("patch_embed", "cls_token", "reg_token", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers - 1

    def forward(self, x: Tensor) -> BackboneOutput:
        # timm's public tap: every block runs; the local tap is block `local_block`'s raw output as a
        # (B, C, h, w) map, the final tokens come after the final norm (prefix tokens first)
        tokens, (local,) = self.vit.forward_intermediates(
            x, indices=[self.local_block], norm=False, output_fmt="NCHW"
        )
        b, c, h, w = local.shape
        npt = self.num_prefix_tokens
        deep = tokens[:, npt:].reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        return BackboneOutput(local=local, deep=deep, cls=tokens[:, 0] if self.has_cls else None)


class ResNetBackbone(nn.Module):
    """timm ResNet-50/101 (DOLG): stage 3 -> local (stride 16), stage 4 -> deep (stride 32)."""

    def __init__(
        self,
        name: str = "resnet50",
        pretrained: bool = False,
        checkpoint: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str | None = None,
        **model_kwargs,
    ) -> None:
        super().__init__()
        # a checkpoint wins over pretrained=true
        self.cnn = timm.create_model(
            name, **pretrained_kwargs(name, pretrained, checkpoint), num_classes=0, **model_kwargs
        )
        for attr in ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            if not hasattr(self.cnn, attr):
                raise ValueError(f"ResNetBackbone: timm model {name!r} is not a ResNet (no .{attr})")
        chs = {info["module"]: info["num_chs"] for info in self.cnn.feature_info}
        self.local_dim, self.deep_dim = int(chs["layer3"]), int(chs["layer4"])
        self.stride = 16  # of the local map; the deep map has stride 32
        # size multiple 1: convolutions take any size, and DOLG's release feeds images at their own size
        self.input_config = resolve_input_config(self.cnn, 1, mean, std, interpolation)
        if checkpoint:
            load_backbone_checkpoint(self.cnn, checkpoint)

    @property
    def num_layers(self) -> int:
        """Depth for layer-wise lr decay: stem = 0, layer1..layer4 = 1..4."""
        return 5

    def layer_id(self, name: str) -> int:
        name = name.removeprefix("cnn.")
        if name.startswith("layer"):
            return int(name[5])
        return 0

    def forward(self, x: Tensor) -> BackboneOutput:
        m = self.cnn
        x = m.maxpool(m.act1(m.bn1(m.conv1(x))))
        x = m.layer2(m.layer1(x))
        local = m.layer3(x)
        deep = m.layer4(local)
        return BackboneOutput(local=local, deep=deep, cls=None)


def save_backbone_state_dict(backbone: nn.Module, path: str | Path) -> None:
    """Write the inner timm model's state dict atomically (used by tests and to export weights)."""
    inner = getattr(backbone, "vit", None) or getattr(backbone, "cnn", None) or backbone
    atomic_replace(lambda f: torch.save(inner.state_dict(), f), path)
