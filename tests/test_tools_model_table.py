"""The params/FLOPs table: counts agree between meta and real CPU runs and with known figures."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from dalg.tools.model_table import build_model, count_flops, main, model_stats


def test_flop_counter_convention_is_two_per_mac() -> None:
    assert count_flops(nn.Linear(10, 7, bias=False), torch.zeros(3, 10)) == 2 * 3 * 10 * 7


def test_cpu_attention_is_counted() -> None:
    class Attn(nn.Module):
        def forward(self, q: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    q = torch.zeros(1, 2, 16, 8)
    assert count_flops(Attn(), q) == 2 * (2 * 1 * 2 * 16 * 16 * 8)  # QK^T and AV


def test_resnet50_matches_published_macs() -> None:
    with torch.device("meta"):
        m = timm.create_model("resnet50")
    gflops = count_flops(m, torch.zeros(1, 3, 224, 224, device="meta")) / 1e9
    assert gflops == pytest.approx(2 * 4.09, rel=0.01)  # ResNet-50: 4.1 GMACs at 224 (He et al. 2016)


def test_meta_count_equals_cpu_count() -> None:
    x = torch.zeros(1, 3, 96, 112)
    meta = count_flops(build_model("dalg_tiny", device="meta"), x.to("meta"))
    cpu = count_flops(build_model("dalg_tiny", device="cpu"), x)
    assert meta == cpu > 0


def test_stats_and_cli(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    s = model_stats("dolg_tiny", size=128)
    assert s.descriptor_dim == 512 and s.scales == (0.7071, 1.0)
    assert s.gflops_all_scales > s.gflops > 0
    assert s.params_m > s.backbone_params_m > 0
    narrow = model_stats("dolg_tiny", size=128, overrides={"embed_dim": 64, "scales": [1.0]})
    assert (
        narrow.descriptor_dim == 64 and narrow.scales == (1.0,) and narrow.gflops_all_scales == narrow.gflops
    )
    out = tmp_path / "t.md"
    main(["--size", "64", "--models", "dalg_tiny", "dolg_tiny", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| dalg_tiny |" in printed and "| dolg_tiny |" in printed and "2 x multiply-adds" in printed
    assert out.read_text() in printed
