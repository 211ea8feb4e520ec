"""Margin heads against logits worked out by hand on 2-D unit vectors at known angles."""

from __future__ import annotations

import math

import pytest
import torch

from dalg.models.heads import ArcFace, CosFace, CurricularFace, MarginHead, SubCenterArcFace


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def head_with_classes(cls: type[MarginHead], angles: list[float], **kw) -> MarginHead:
    head = cls(embed_dim=2, num_classes=len(angles), **kw)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([unit(a) for a in angles]) * 3.0)  # norm must not matter
    return head


CLASS_ANGLES = [0.0, 90.0, 180.0]
# embeddings at 60 deg (label 0) and at 170 deg (label 0: theta + m > pi with m = 0.5)
EMB = torch.tensor([unit(60.0), unit(170.0)]) * torch.tensor([[2.0], [0.5]])
LABELS = torch.tensor([0, 0])
S, M = 10.0, 0.5


def cosines(deg: float) -> list[float]:
    return [math.cos(math.radians(deg - a)) for a in CLASS_ANGLES]


def test_no_labels_gives_scaled_cosine() -> None:
    head = head_with_classes(ArcFace, CLASS_ANGLES, scale=S, margin=M)
    expected = torch.tensor([cosines(60.0), cosines(170.0)]) * S
    torch.testing.assert_close(head(EMB), expected, rtol=1e-5, atol=1e-5)


def test_arcface_by_hand_including_wrap() -> None:
    head = head_with_classes(ArcFace, CLASS_ANGLES, scale=S, margin=M)
    t60, t170 = math.radians(60.0), math.radians(170.0)
    row0 = cosines(60.0)
    row0[0] = math.cos(t60 + M)  # plain additive angular margin
    row1 = cosines(170.0)
    assert t170 + M > math.pi
    row1[0] = math.cos(t170) - M * math.sin(M)  # wrap: linear continuation, not cos(theta + m)
    assert row1[0] < math.cos(t170 + M)  # the naive formula would raise the target logit again
    torch.testing.assert_close(head(EMB, LABELS), torch.tensor([row0, row1]) * S, rtol=1e-5, atol=1e-5)


def test_cosface_by_hand() -> None:
    head = head_with_classes(CosFace, CLASS_ANGLES, scale=S, margin=0.35)
    row0, row1 = cosines(60.0), cosines(170.0)
    row0[0] -= 0.35
    row1[0] -= 0.35
    torch.testing.assert_close(head(EMB, LABELS), torch.tensor([row0, row1]) * S, rtol=1e-5, atol=1e-5)


def test_curricularface_by_hand() -> None:
    head = head_with_classes(CurricularFace, CLASS_ANGLES, scale=S, margin=M).train()
    emb = torch.tensor([unit(60.0)])
    labels = torch.tensor([0])
    cos_y = math.cos(math.radians(60.0))
    t = 0.01 * cos_y  # EMA from t = 0, updated before use
    target = math.cos(math.radians(60.0) + M)  # = cos(88.6 deg) ~ 0.024
    c = cosines(60.0)
    # class 1 (cos 30 deg = 0.866) is harder than the margin target: modulated; class 2 (-0.5) is not
    expected = [target, c[1] * (t + c[1]), c[2]]
    torch.testing.assert_close(head(emb, labels), torch.tensor([expected]) * S, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.t, torch.tensor(t))
    head.eval()
    head(emb, labels)
    torch.testing.assert_close(head.t, torch.tensor(t))  # no update in eval mode


def test_subcenter_arcface_uses_nearest_centre() -> None:
    # class 0 has centres at 0, 90, 180 deg; class 1 at 45, 225, 270 deg
    head = SubCenterArcFace(embed_dim=2, num_classes=2, scale=S, margin=M, k=3)
    with torch.no_grad():  # rows are class-major: class c, centre j at row c * k + j
        head.weight.copy_(torch.tensor([unit(a) for a in [0.0, 90.0, 180.0, 45.0, 225.0, 270.0]]))
    emb = torch.tensor([unit(80.0)])
    c0 = math.cos(math.radians(10.0))  # nearest class-0 centre: 90 deg
    c1 = math.cos(math.radians(35.0))  # nearest class-1 centre: 45 deg
    expected = torch.tensor([[math.cos(math.radians(10.0) + M), c1]]) * S
    torch.testing.assert_close(head(emb, torch.tensor([0])), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head(emb), torch.tensor([[c0, c1]]) * S, rtol=1e-5, atol=1e-5)


def test_subcenter_shapes() -> None:
    head = SubCenterArcFace(embed_dim=8, num_classes=5, k=3)
    assert head.weight.shape == (15, 8)
    assert head(torch.randn(4, 8), torch.tensor([0, 1, 2, 4])).shape == (4, 5)


def test_bad_labels_raise() -> None:
    head = ArcFace(embed_dim=4, num_classes=3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        head(torch.randn(2, 4), torch.tensor([0, 3]))


def test_margin_gradient_is_finite_at_extremes() -> None:
    head = head_with_classes(ArcFace, CLASS_ANGLES, scale=S, margin=M)
    emb = torch.tensor([unit(0.0), unit(180.0)], requires_grad=True)  # cos = +1 and -1 on the target
    torch.nn.functional.cross_entropy(head(emb, torch.tensor([0, 0])), torch.tensor([0, 0])).backward()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()
