"""The ablation collector: job folders (config.yaml + metrics.json) -> markdown table, JSON and bar chart."""

import importlib.util
import json

import pytest
import yaml

from .conftest import REPO


def _collect_module():
    spec = importlib.util.spec_from_file_location(
        "ablation_collect", REPO / "experiments" / "ablation" / "collect.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _job(root, num, fusion_cls, bb_name, depth, width, m, seed=42, steps=24):
    job = root / str(num)
    job.mkdir(parents=True)
    cfg = {
        "seed": seed,
        "trainer": {"max_epochs": 1},
        "model": {
            "fusion": {"_target_": f"dalg.models.fusion.{fusion_cls}"},
            "backbone": {"name": bb_name, "depth": depth, "embed_dim": width},
        },
    }
    (job / "config.yaml").write_text(yaml.safe_dump(cfg))
    metrics = {
        f"val/{s}/mAP_{k}": m + (1 if k == "M" else 0) + (10 if s == "synthetic_heldout" else 0)
        for s in ("synthetic_heldout", "landmarks_mini")
        for k in ("M", "H")
    }
    (job / "metrics.json").write_text(
        json.dumps({"metrics": metrics, "global_step": steps, "elapsed_s": 60.0})
    )


def test_collect_writes_table_json_and_png(tmp_path):
    mod = _collect_module()
    sweep = tmp_path / "sweep"
    _job(sweep, 0, "CrossAttentionFusion", "vit_tiny_patch16_224", 6, 128, 30.0)
    _job(sweep, 1, "OrthogonalFusion", "vit_tiny_patch16_224", 6, 128, 20.0)
    _job(sweep, 2, "CrossAttentionFusion", "deit_tiny_distilled_patch16_224", 4, 160, 25.0)
    (sweep / "3").mkdir()  # an unfinished job: no config, skipped
    made = mod.collect(sweep, tmp_path / "out", command="python src/train.py -m ...", wall_s=600)
    md = made["table"].read_text()
    assert "| cross_attention | 41.00 | 40.00 | 31.00 | 30.00 | 36.00 | 35.00 | 26.00 | 25.00 |" in md
    assert "| orthogonal | 31.00 | 30.00 | 21.00 | 20.00 | - | - | - | - |" in md
    assert "python src/train.py -m ..." in md and "10.0 min" in md
    rows = json.loads(made["json"].read_text())
    assert {(r["fusion"], r["backbone"]) for r in rows} == {
        ("cross_attention", "vit6x128"),
        ("orthogonal", "vit6x128"),
        ("cross_attention", "deit4x160"),
    }
    png = made["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_collect_merges_seeds_into_mean_and_std(tmp_path):
    mod = _collect_module()
    vit = ("vit_tiny_patch16_224", 6, 128)
    _job(tmp_path / "s0", 0, "CrossAttentionFusion", *vit, 30.0, seed=0)
    _job(tmp_path / "s0", 1, "OrthogonalFusion", *vit, 20.0, seed=0)
    _job(tmp_path / "s12", 0, "CrossAttentionFusion", *vit, 32.0, seed=1)
    _job(tmp_path / "s12", 1, "CrossAttentionFusion", *vit, 34.0, seed=2)
    made = mod.collect([tmp_path / "s0", tmp_path / "s12"], tmp_path / "out")
    md = made["table"].read_text()
    # cross-attention: held-out M = 41, 43, 45 -> 43.0 ± 2.0; orthogonal ran one seed -> plain value
    assert "| cross_attention | 43.0 ± 2.0 | 42.0 ± 2.0 | 33.0 ± 2.0 | 32.0 ± 2.0 |" in md
    assert "| orthogonal | 31.00 | 30.00 | 21.00 | 20.00 |" in md
    assert "seeds 0, 1, 2" in md and "median over cells: synthetic held-out mAP_M 2.0" in md
    assert len(json.loads(made["json"].read_text())) == 4


def test_collect_refuses_runs_that_are_not_one_ablation(tmp_path):
    mod = _collect_module()
    vit = ("vit_tiny_patch16_224", 6, 128)
    _job(tmp_path / "a", 0, "CrossAttentionFusion", *vit, 30.0, seed=0)
    _job(tmp_path / "b", 0, "CrossAttentionFusion", *vit, 31.0, seed=1, steps=48)
    with pytest.raises(SystemExit, match="differ in global_step"):
        mod.collect([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    _job(tmp_path / "c", 0, "CrossAttentionFusion", *vit, 31.0, seed=0)
    with pytest.raises(SystemExit, match="repeats a/0"):
        mod.collect([tmp_path / "a", tmp_path / "c"], tmp_path / "out")
