"""Margin heads against logits worked out by hand on 2-D unit vectors at known angles."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist

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


HEADS = [ArcFace, CosFace, CurricularFace, SubCenterArcFace]


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("emb_dtype", [torch.float32, torch.bfloat16])
def test_logits_under_bf16_autocast_equal_float32(cls: type[MarginHead], emb_dtype: torch.dtype) -> None:
    """bf16-mixed training: the head must not compute cosines or margins in bf16 (errors ~0.1-0.2 logits at s=30);
    a bf16 embedding (the descriptor Linear's output under autocast) is taken at its exact value."""
    torch.manual_seed(0)
    head = cls(embed_dim=64, num_classes=300, scale=30.0, margin=0.15).train()
    if isinstance(head, CurricularFace):
        head.t.fill_(0.3)  # a non-zero t, so the hard-example modulation shows in the logits
    ref_head = copy.deepcopy(head)
    emb = torch.randn(16, 64).to(emb_dtype)
    labels = torch.randint(0, 300, (16,))
    emb.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head(emb, labels)
        got_plain = head(emb)
    ref = ref_head(emb.detach().float(), labels)
    torch.testing.assert_close(got.float(), ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(got_plain.float(), ref_head(emb.detach().float()), rtol=0, atol=1e-4)
    assert got.dtype == torch.float32 and got_plain.dtype == torch.float32
    if isinstance(head, CurricularFace):
        torch.testing.assert_close(head.t, ref_head.t, rtol=0, atol=1e-6)
    got.sum().backward()
    assert emb.grad is not None and emb.grad.dtype == emb_dtype and torch.isfinite(emb.grad.float()).all()


def _t_after_one_step(emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    head = CurricularFace(embed_dim=8, num_classes=5, scale=10.0, margin=0.3).train()
    head.t.fill_(0.2)
    logits = head(emb, labels)
    return head.t.detach().clone(), logits.detach()


def _ddp_batches() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Different batches, of different sizes, on the two processes."""
    g = torch.Generator().manual_seed(7)
    emb = torch.randn(9, 8, generator=g)
    labels = torch.randint(0, 5, (9,), generator=g)
    return [emb[:3], emb[3:]], [labels[:3], labels[3:]]


def _curricular_worker(rank: int, world: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        embs, labels = _ddp_batches()
        t, logits = _t_after_one_step(embs[rank], labels[rank])
        torch.save({"t": t, "logits": logits}, f"{tmp}/curricular_{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_curricularface_t_is_synchronised_across_processes(tmp_path) -> None:
    from tests.test_retrieval_ddp import _spawn_two  # the repo's 2-process gloo launcher

    _spawn_two(_curricular_worker, tmp_path)
    embs, labels = _ddp_batches()
    t_single, logits_single = _t_after_one_step(torch.cat(embs), torch.cat(labels))
    # the single-process value is the EMA step on the mean target cosine of the concatenated batch
    torch.manual_seed(0)
    head = CurricularFace(embed_dim=8, num_classes=5, scale=10.0, margin=0.3)
    cos_y = head.cosine(torch.cat(embs)).gather(1, torch.cat(labels)[:, None])
    torch.testing.assert_close(t_single, 0.99 * 0.2 + 0.01 * cos_y.mean())
    out = [torch.load(tmp_path / f"curricular_{r}.pt", weights_only=True) for r in range(2)]
    for r in range(2):
        torch.testing.assert_close(out[r]["t"], t_single, rtol=0, atol=1e-7)
    # t enters the non-target logits: each process's logits are its rows of the single-process logits
    torch.testing.assert_close(torch.cat([out[0]["logits"], out[1]["logits"]]), logits_single)
