"""Global branch poolings (gem, gem_proj, mean, cls) on hand-made inputs, their gradients, GeM's learnt p."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dalg.factory import create_model
from dalg.models.global_branch import POOLINGS, GeM, GlobalBranch

# one image, 2 channels on a 2x2 map: channel 0 mixed signs, channel 1 all negative
X = torch.tensor([[[[1.0, -2.0], [3.0, -0.5]], [[-1.0, -2.0], [-3.0, -0.5]]]])
CLS = torch.tensor([[0.25, -4.0]])


def _branch(pooling: str, **kw) -> GlobalBranch:
    gb = GlobalBranch(in_dim=2, out_dim=3, p=3.0, learn_p=False, pooling=pooling, **kw)
    with torch.no_grad():  # identity projection to g, so g is the pooled vector
        gb.proj = torch.nn.Linear(2, 2)
        gb.proj.weight.copy_(torch.eye(2))
        gb.proj.bias.zero_()
        if gb.pre is not None:  # identity 1x1 projection before the activation
            gb.pre[0].weight.copy_(torch.eye(2)[:, :, None, None])
            gb.pre[0].bias.zero_()
    return gb


def _gem(v: list[float], p: float = 3.0, eps: float = 1e-6) -> float:
    return (sum(max(a, eps) ** p for a in v) / len(v)) ** (1 / p)


def test_poolings_on_hand_made_inputs() -> None:
    c0, c1 = [1.0, -2.0, 3.0, -0.5], [-1.0, -2.0, -3.0, -0.5]
    expect = {
        "gem": [_gem(c0), _gem(c1)],  # negatives count as eps
        "mean": [sum(c0) / 4, sum(c1) / 4],
        "cls": CLS[0].tolist(),
    }
    for pooling, want in expect.items():
        torch.testing.assert_close(_branch(pooling)(X, CLS), torch.tensor([want]), rtol=1e-5, atol=1e-6)
    for act, fn in (("relu", F.relu), ("softplus", F.softplus)):
        want = [_gem(fn(torch.tensor(c)).tolist()) for c in (c0, c1)]
        got = _branch("gem_proj", proj_act=act)(X, CLS)
        torch.testing.assert_close(got, torch.tensor([want]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["gem_proj", "mean", "cls"])
def test_vit_poolings_pass_gradient_to_negative_values(pooling: str) -> None:
    """Plain GeM gives no gradient to the all-negative channel; the ViT poolings do."""
    torch.manual_seed(0)
    gb = GlobalBranch(in_dim=2, out_dim=3, pooling=pooling)
    x, cls = X.clone().requires_grad_(True), CLS.clone().requires_grad_(True)
    gb(x, cls).square().sum().backward()
    grad = cls.grad if pooling == "cls" else x.grad
    values = cls if pooling == "cls" else x
    assert (grad[values < 0] != 0).all()


def test_plain_gem_gives_no_gradient_below_eps() -> None:
    gb = GlobalBranch(in_dim=2, out_dim=3, pooling="gem")
    x = X.clone().requires_grad_(True)
    gb(x, None).square().sum().backward()
    assert (x.grad[x < 0] == 0).all() and (x.grad[x > 0] != 0).all()


def test_learnt_p_below_one_still_gets_a_gradient() -> None:
    """p is used at >= 1 but its gradient passes the clamp, so a p that drifted below 1 can come back."""
    gem = GeM(p=3.0)
    x = torch.rand(2, 4, 3, 3) + 0.1
    with torch.no_grad():
        gem.p.fill_(0.8)
    out = gem(x)
    torch.testing.assert_close(out, x.mean(dim=(2, 3)))  # used at p = 1: the arithmetic mean
    out.sum().backward()  # a larger p raises a generalised mean: d/dp > 0
    assert gem.p.grad is not None and gem.p.grad > 0


def test_bad_pooling_options_raise() -> None:
    with pytest.raises(ValueError, match="pooling must be one of"):
        GlobalBranch(in_dim=2, pooling="max")
    with pytest.raises(ValueError, match="twice"):
        GlobalBranch(in_dim=2, pooling="cls", use_cls=True)
    with pytest.raises(ValueError, match="proj_act"):
        GlobalBranch(in_dim=2, pooling="gem_proj", proj_act="gelu")
    with pytest.raises(ValueError, match="CLS token"):
        GlobalBranch(in_dim=2, pooling="cls")(X, None)
    with pytest.raises(ValueError, match="p must be >= 1"):
        GeM(p=0.5)


def test_every_pooling_config_builds_in_dalg_tiny() -> None:
    for pooling in POOLINGS:
        torch.manual_seed(0)
        model = create_model("dalg_tiny", global_branch=pooling, num_classes=4)
        assert model.global_branch.pooling == pooling
        d = model(torch.randn(2, 3, 48, 48))
        y = torch.tensor([0, 3])
        F.cross_entropy(model.head(d, y), y).backward()
        assert (
            model.backbone.vit.norm.weight.grad.abs().sum() > 0
        )  # the final norm's output is what is pooled
