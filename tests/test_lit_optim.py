"""Optimiser groups: weight-decay split, layer-wise lr decay on ViT blocks, the margin head in the optimiser."""

import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dalg.lit.optim import build_optimizer, parameter_groups, warmup_cosine

from .conftest import CONF


@pytest.fixture(scope="module")
def tiny_dalg():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=dalg_tiny"])
    torch.manual_seed(0)
    return instantiate(OmegaConf.to_container(cfg.model, resolve=True), num_classes=7)


def test_layer_decay_scales_lr_per_block_and_keeps_head_at_base_lr(tiny_dalg):
    # the backbone's own layer ids: embeddings 0, block k -> k + 1, final norm depth + 1; num_layers = depth + 2
    assert tiny_dalg.backbone.num_layers == 8
    opt = build_optimizer(lambda params: torch.optim.AdamW(params, lr=1e-3), tiny_dalg, 0.05, layer_decay=0.5)
    lr_of = {}
    for g in opt.param_groups:
        for n in g["names"]:
            lr_of[n] = g["lr"]
    assert lr_of["head.weight"] == pytest.approx(1e-3)
    assert lr_of["descriptor.weight"] == pytest.approx(1e-3)
    assert lr_of["backbone.vit.norm.weight"] == pytest.approx(1e-3 * 0.5)
    assert lr_of["backbone.vit.blocks.5.attn.qkv.weight"] == pytest.approx(1e-3 * 0.5**2)
    assert lr_of["backbone.vit.blocks.0.attn.qkv.weight"] == pytest.approx(1e-3 * 0.5**7)
    assert lr_of["backbone.vit.patch_embed.proj.weight"] == pytest.approx(1e-3 * 0.5**8)
    # the local branch's window blocks are not ViT blocks: base lr
    assert all(v == pytest.approx(1e-3) for k, v in lr_of.items() if k.startswith("local_branch."))
    # every trainable parameter is optimised exactly once, the margin head's included
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in tiny_dalg.parameters() if p.requires_grad)
    assert {id(p) for p in tiny_dalg.head.parameters()} <= set(ids)


def test_no_layer_decay_gives_one_lr_and_decay_split(tiny_dalg):
    groups = parameter_groups(tiny_dalg, 0.05, None)
    assert {g["lr_scale"] for g in groups} == {1.0}
    for g in groups:
        for n, p in zip(g["names"], g["params"]):
            assert (g["weight_decay"] == 0.0) == (
                p.ndim <= 1 or n.endswith((".bias", "pos_embed", "cls_token"))
            ), n


def test_sgd_nesterov_step_trains_the_margin_head(tiny_dalg):
    opt = build_optimizer(
        lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9, nesterov=True), tiny_dalg, 1e-4
    )
    assert opt.defaults["nesterov"] is True
    before = {n: p.detach().clone() for n, p in tiny_dalg.head.named_parameters()}
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    loss = F.cross_entropy(tiny_dalg.head(tiny_dalg(x), y), y)
    loss.backward()
    opt.step()
    assert before, "the margin head has no parameters"
    assert all(not torch.equal(before[n], p) for n, p in tiny_dalg.head.named_parameters())


def test_layer_decay_out_of_range_is_refused(tiny_dalg):
    with pytest.raises(ValueError, match="layer_decay"):
        build_optimizer(lambda params: torch.optim.AdamW(params, lr=1e-3), tiny_dalg, 0.05, layer_decay=1.5)


def test_warmup_then_cosine():
    total, warm = 100, 10
    lrs = [warmup_cosine(s, warm, total, 0.01) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[warm - 1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:warm], lrs[1:warm]))
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1 :]))
    assert warmup_cosine(total, warm, total, 0.01) == pytest.approx(0.01)
    mid = warm + (total - warm) // 2
    assert lrs[mid] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_decay_everything_as_dolgs_release(tiny_dalg):
    """optim.no_decay_bias_norm=false (optim=sgd_cosine, DOLG's release): biases, norms and GeM's p decay too."""
    exempt = {n for n, p in tiny_dalg.named_parameters() if p.ndim <= 1 or n.endswith((".bias", ".p"))}
    assert any(n.endswith(".p") for n in exempt) and any(".norm" in n for n in exempt)  # GeM's p, norms
    split = parameter_groups(tiny_dalg, 1e-4, None, no_decay_bias_norm=True)
    assert {n for g in split if g["weight_decay"] == 0.0 for n in g["names"]} >= exempt
    every = parameter_groups(tiny_dalg, 1e-4, None, no_decay_bias_norm=False)
    assert {g["weight_decay"] for g in every} == {1e-4}
    assert sum(len(g["names"]) for g in every) == sum(1 for p in tiny_dalg.parameters() if p.requires_grad)


@pytest.mark.parametrize("optim, decays_all", [("sgd_cosine", True), ("adamw", False), ("adamw_cpu", False)])
def test_optim_configs_reach_the_optimizer(optim, decays_all, tmp_path):
    """The config value travels through RetrievalModule.configure_optimizers (not only build_optimizer)."""
    from types import SimpleNamespace

    from dalg.train_pipeline import build_module

    from .conftest import compose_train

    module = build_module(compose_train(["model=dalg_tiny", f"optim={optim}"], tmp_path), num_classes=7)
    module._trainer = SimpleNamespace(
        estimated_stepping_batches=10, max_epochs=2
    )  # what configure_optimizers reads
    opt = module.configure_optimizers()["optimizer"]
    assert (min(g["weight_decay"] for g in opt.param_groups) > 0) == decays_all
