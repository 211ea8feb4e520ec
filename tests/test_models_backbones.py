"""Backbone adapters: dynamic input size, taps, and local checkpoints loaded through the Hydra config."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch

from dalg.factory import create_model, model_config
from dalg.models.backbones import ResNetBackbone, ViTBackbone, save_backbone_state_dict

TINY = dict(embed_dim=32, depth=3, num_heads=2, img_size=64)


def tiny_vit(**kw) -> ViTBackbone:
    return ViTBackbone("vit_tiny_patch16_224", **{**TINY, **kw})


@pytest.mark.parametrize("hw", [(64, 64), (50, 70), (16, 160), (200, 96)])
def test_vit_any_size(hw: tuple[int, int]) -> None:
    bb = tiny_vit().eval()
    out = bb(torch.randn(2, 3, *hw))
    h, w = -(-hw[0] // 16), -(-hw[1] // 16)  # padded up to the patch size
    assert out.local.shape == (2, 32, h, w) and out.deep.shape == (2, 32, h, w)
    assert out.cls is not None and out.cls.shape == (2, 32)
    assert bb.stride == 16 and bb.local_dim == bb.deep_dim == 32


def test_vit_local_tap_is_the_configured_block() -> None:
    bb = tiny_vit(local_block=1).eval()
    x = torch.randn(1, 3, 48, 32)
    captured = {}
    bb.vit.blocks[1].register_forward_hook(lambda m, i, o: captured.setdefault("t", o))
    out = bb(x)
    ref = captured["t"][:, 1:].reshape(1, 3, 2, 32).permute(0, 3, 1, 2)
    torch.testing.assert_close(out.local, ref)
    assert tiny_vit().local_block == 1  # default round(2/3 * 3) - 1
    assert ViTBackbone("vit_tiny_patch16_224", embed_dim=32, depth=12, num_heads=2).local_block == 7
    with pytest.raises(ValueError, match="local_block"):
        tiny_vit(local_block=3)


@pytest.mark.parametrize("hw", [(64, 48), (50, 70)])
def test_vit_taps_equal_timms_own_forward(hw: tuple[int, int]) -> None:
    """The backbone reads the ViT through timm's public forward_intermediates: its deep map and CLS token are
    forward_features' tokens, its local map the output of block local_block (a forward hook), bit for bit."""
    torch.manual_seed(0)
    bb = tiny_vit(local_block=1, reg_tokens=2).eval()  # register tokens: prefix tokens besides the CLS
    x = torch.randn(2, 3, *hw)
    captured = {}
    bb.vit.blocks[1].register_forward_hook(lambda m, i, o: captured.setdefault("local", o))
    with torch.no_grad():
        out = bb(x)
        captured.pop("local")
        final = bb.vit.forward_features(x)
    h, w = -(-hw[0] // 16), -(-hw[1] // 16)
    npt = bb.num_prefix_tokens
    assert npt == 3
    as_map = lambda t: t[:, npt:].reshape(2, h, w, 32).permute(0, 3, 1, 2)  # noqa: E731
    torch.testing.assert_close(out.deep, as_map(final), rtol=0, atol=0)
    torch.testing.assert_close(out.cls, final[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(out.local, as_map(captured["local"]), rtol=0, atol=0)


def test_resnet_stage_maps() -> None:
    bb = ResNetBackbone("resnet26").eval()
    with torch.no_grad():
        out = bb(torch.randn(1, 3, 96, 64))
    assert (bb.local_dim, bb.deep_dim) == (1024, 2048)
    assert out.local.shape == (1, 1024, 6, 4) and out.deep.shape == (1, 2048, 3, 2) and out.cls is None


def _compose(**overrides):
    return model_config("dalg_tiny", **overrides)


def test_checkpoint_roundtrip_through_config(tmp_path: Path) -> None:
    torch.manual_seed(3)
    src = hydra.utils.instantiate(_compose().backbone)
    path = tmp_path / "vit_tiny_cpu.pth"
    save_backbone_state_dict(src, path)
    model = create_model("dalg_tiny", **{"backbone.checkpoint": str(path)})
    theirs, ours = src.vit.state_dict(), model.backbone.vit.state_dict()
    assert theirs.keys() == ours.keys()
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)
    fresh = hydra.utils.instantiate(_compose().backbone)
    assert not torch.equal(fresh.vit.patch_embed.proj.weight, src.vit.patch_embed.proj.weight)


def test_checkpoint_wrapped_prefixed_and_with_classifier(tmp_path: Path) -> None:
    """A Lightning-style {'state_dict': {'module.<key>'}} with a classifier and another pos-embed grid loads."""
    import timm

    full = timm.create_model("vit_tiny_patch16_224", num_classes=10, **{**TINY, "img_size": 96})
    sd = {f"module.{k}": v for k, v in full.state_dict().items()}
    path = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    bb = tiny_vit(checkpoint=str(path))
    torch.testing.assert_close(bb.vit.blocks[2].mlp.fc2.weight, full.blocks[2].mlp.fc2.weight, rtol=0, atol=0)
    assert bb.vit.pos_embed.shape == (1, 17, 32)  # 6x6 grid resampled to the model's 4x4


@pytest.mark.parametrize("outer", ["net.", "ema.net.", ""])
def test_backbone_found_inside_a_whole_networks_checkpoint(tmp_path: Path, outer: str) -> None:
    """A training checkpoint holds the backbone under the path of the network in the LightningModule; the
    loader finds that prefix from the keys (it knows no attribute names) and ignores the network's other parts."""
    from dalg.factory import create_model

    torch.manual_seed(4)
    net = create_model("dalg_tiny", num_classes=3)
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"{outer}{k}": v for k, v in net.state_dict().items()}, "epoch": 1}, path)
    model = create_model("dalg_tiny", **{"backbone.checkpoint": str(path)})
    for k, v in net.backbone.vit.state_dict().items():
        torch.testing.assert_close(model.backbone.vit.state_dict()[k], v, rtol=0, atol=0)
    assert not torch.equal(model.descriptor.weight, net.descriptor.weight)  # only the backbone was loaded


def test_missing_and_mismatched_keys_name_file_and_keys(tmp_path: Path) -> None:
    sd = tiny_vit().vit.state_dict()
    missing = dict(sd)
    del missing["blocks.1.attn.qkv.weight"]
    p1 = tmp_path / "missing.pth"
    torch.save(missing, p1)
    with pytest.raises(ValueError, match=r"missing\.pth.*1 missing.*blocks\.1\.attn\.qkv\.weight"):
        tiny_vit(checkpoint=str(p1))
    wrong = dict(sd)
    wrong["blocks.0.norm1.weight"] = torch.ones(64)
    p2 = tmp_path / "wrong.pth"
    torch.save(wrong, p2)
    with pytest.raises(
        ValueError,
        match=r"wrong\.pth.*1 differ in shape.*blocks\.0\.norm1\.weight: \(64,\) in the file vs \(32,\)",
    ):
        tiny_vit(checkpoint=str(p2))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        tiny_vit(checkpoint=str(tmp_path / "nope.pth"))
    p3 = tmp_path / "r.pth"
    torch.save(ResNetBackbone("resnet26").cnn.state_dict(), p3)
    with pytest.raises(ValueError, match=r"r\.pth.*unexpected"):
        tiny_vit(checkpoint=str(p3))


def test_resnet_checkpoint_safetensors(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    full = timm.create_model("resnet26")  # with its fc classifier, as timm ships it
    path = tmp_path / "r26.safetensors"
    save_file(full.state_dict(), str(path))
    bb = ResNetBackbone("resnet26", checkpoint=str(path))
    torch.testing.assert_close(bb.cnn.layer3[0].conv1.weight, full.layer3[0].conv1.weight, rtol=0, atol=0)


def test_checkpoint_wins_over_pretrained_without_asking_the_hub(tmp_path: Path, monkeypatch) -> None:
    """Real-size configs default to pretrained=true: model.backbone.checkpoint=<file> alone must be enough."""
    import dalg.models.pretrained as pretrained

    def no_hub(name):
        raise AssertionError(f"asked for the pretrained weights of {name} although a checkpoint was given")

    monkeypatch.setattr(pretrained, "locate_pretrained", no_hub)
    src = tiny_vit()
    path = tmp_path / "mine.pth"
    save_backbone_state_dict(src, path)
    bb = tiny_vit(pretrained=True, checkpoint=str(path))
    torch.testing.assert_close(
        bb.vit.blocks[0].attn.qkv.weight, src.vit.blocks[0].attn.qkv.weight, rtol=0, atol=0
    )
    with pytest.raises(
        FileNotFoundError, match="x.pth"
    ):  # and a missing one is named, not replaced by the hub's
        tiny_vit(pretrained=True, checkpoint=str(tmp_path / "x.pth"))


def test_layer_ids_for_layerwise_decay() -> None:
    bb = tiny_vit()
    ids = {n: bb.layer_id(n) for n, _ in bb.named_parameters()}
    assert ids["vit.pos_embed"] == 0 and ids["vit.patch_embed.proj.weight"] == 0
    assert ids["vit.blocks.0.attn.qkv.weight"] == 1 and ids["vit.blocks.2.mlp.fc2.bias"] == 3
    assert ids["vit.norm.weight"] == bb.num_layers - 1 == 4
    rn = ResNetBackbone("resnet26")
    assert rn.layer_id("cnn.conv1.weight") == 0 and rn.layer_id("cnn.layer3.0.conv1.weight") == 3


def test_backbone_from_a_whole_dalg_state_dict(tmp_path: Path) -> None:
    """Fine-tuning from an earlier run: the backbone is taken out of a Lightning checkpoint's `net.` dict."""
    torch.manual_seed(4)
    model = create_model("dalg_tiny", num_classes=3)
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in model.state_dict().items()}}, path)
    bb = hydra.utils.instantiate(_compose(**{"backbone.checkpoint": str(path)}).backbone)
    torch.testing.assert_close(
        bb.vit.blocks[5].attn.proj.weight, model.backbone.vit.blocks[5].attn.proj.weight, rtol=0, atol=0
    )
