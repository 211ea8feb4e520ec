"""Every shipped model config instantiates through Hydra and runs forward and backward (small inputs on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dalg.factory import create_model, instantiate_model, model_config, model_names
from dalg.models.composer import DALG
from tests.conftest import compose_train

MODELS = model_names()
SLOW = {
    "dolg_r101"
}  # the biggest (65M params); dolg_r50 and dolg_tiny keep the ResNet family in the default suite
# whole models; a fusion variant is model/fusion=<name>, not a config of its own (dalg_heuristic, DOLG's fusion
# on DALG, stays: a command users run)
EXPECTED = {"dalg_cross", "dalg_heuristic", "dalg_tiny", "dolg_r50", "dolg_r101", "dolg_tiny"}


def build(name: str, overrides: list[str] | None = None, num_classes: int = 5) -> DALG:
    """Model config ``name`` with random weights (real-size backbone configs ask for pretrained ones), with
    command-line overrides (``model.x=...``, ``model/group=...``) as train.py takes them."""
    if not overrides:
        return create_model(name, num_classes=num_classes)
    cfg = compose_train([f"model={name}", "model.backbone.pretrained=false", *overrides], Path("unused"))
    return instantiate_model(cfg.model, num_classes)


def test_all_issue_configs_ship() -> None:
    assert EXPECTED == set(MODELS)


def test_no_whole_model_config_only_changes_the_fusion() -> None:
    """Pairs of model configs equal but for the fusion: only (dalg_cross, dalg_heuristic)."""
    from omegaconf import OmegaConf

    plain = {n: OmegaConf.to_container(model_config(n), resolve=True) for n in MODELS}
    rest = {n: {k: v for k, v in c.items() if k != "fusion"} for n, c in plain.items()}
    pairs = {(a, b) for a in MODELS for b in MODELS if a < b and rest[a] == rest[b]}
    assert pairs == {("dalg_cross", "dalg_heuristic")}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in MODELS]
)
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = build(name)
    assert isinstance(model, DALG) and model.head is not None
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([0, 4])
    d = model(x)
    assert d.shape == (2, model.embed_dim) and model.embed_dim == 512
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(2))
    torch.nn.functional.cross_entropy(model.head(d, y), y).backward()
    first = next(p for p in model.backbone.parameters() if p.requires_grad)
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_dolg_defaults_to_five_scales_and_dalg_to_one() -> None:
    assert list(model_config("dolg_r50").scales) == [0.3535, 0.5, 0.7071, 1.0, 1.4142]
    assert list(model_config("dalg_cross").scales) == [1.0]


def test_multiscale_extract_is_mean_of_normalised_scales() -> None:
    torch.manual_seed(0)
    model = build("dalg_tiny", num_classes=0).eval()  # extract() is the composer's, shared by DALG and DOLG
    x = torch.randn(1, 3, 96, 80)
    scales = [0.5, 1.0, 1.4142]
    with torch.no_grad():
        got = model.extract(x, scales)
        # each side round(side * s) to the nearest patch multiple (16): 0.5 -> 48 x 32, 1.4142 -> 128 x 112
        per_scale = [
            model(
                x
                if size == (96, 80)
                else torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True)
            )
            for size in ((48, 32), (96, 80), (128, 112))
        ]
    ref = torch.nn.functional.normalize(torch.stack(per_scale).mean(0), dim=-1)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    model.scales = (0.7071, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(
            model.extract(x), model.extract(x, [0.7071, 1.0])
        )  # default: its own scales
    with pytest.raises(ValueError, match="scales"):
        model.extract(x, [0.0])


def test_dalg_cross_is_vit_small_with_cross_attention() -> None:
    with torch.device("meta"):
        model = build("dalg_cross", num_classes=5)
    assert model.backbone.vit.embed_dim == 384 and model.backbone.local_block == 7
    assert type(model.fusion).__name__ == "CrossAttentionFusion" and model.fusion.attn.heads == 8
    assert model.global_branch.out_dim == 1024 and model.local_branch.out_dim == 512
    assert model.local_branch.window_blocks[0].window == 7 and type(model.head).__name__ == "ArcFace"


def test_ablation_is_a_command_line() -> None:
    model = build(
        "dalg_tiny",
        [
            "model/head=cosface",
            "model.local_branch.window=3",
            "model.global_branch.use_cls=true",
            "model.fusion.direction=local_to_global",
            "model.backbone.local_block=2",
            "model.scales=[0.7071,1.0]",
        ],
    )
    assert type(model.head).__name__ == "CosFace" and model.head.margin == 0.35
    assert model.local_branch.window_blocks[0].window == 3 and model.global_branch.use_cls
    assert model.fusion.direction == "local_to_global" and model.backbone.local_block == 2
    assert model.scales == (0.7071, 1.0)
    out = model.forward_features(torch.randn(1, 3, 64, 64))
    assert out["fusion_attention"].shape == (1, 4, 16, 17)


def test_only_the_vit_has_parameters_named_blocks() -> None:
    """Layer-wise lr decay (dalg.lit.optim) finds transformer depth by `blocks.<i>.`: only the backbone's count."""
    import re

    with torch.device("meta"):
        model = build("dalg_tiny")
    named = [n for n, _ in model.named_parameters() if re.search(r"(?:^|\.)blocks\.\d+\.", n)]
    assert named and all(n.startswith("backbone.vit.blocks.") for n in named)
