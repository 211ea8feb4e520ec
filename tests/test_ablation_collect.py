"""The ablation collector: job folders (config.yaml + metrics.json) -> markdown table, JSON and bar chart."""

import importlib.util
import json
from pathlib import Path

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
    assert "seeds 0, 1, 2" in md and "median over cells: synthetic_heldout mAP_M 2.0" in md
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


def _new_job(folder, fusion, m_best, m_last, sets=("roxford5k", "synthetic_heldout")):
    """A job as src/train.py now writes it: metrics.json with best and last; a short tagged folder."""
    folder.mkdir(parents=True)
    cfg = {
        "seed": 42,
        "trainer": {"max_epochs": 2},
        "model": {
            "fusion": {"_target_": f"dalg.models.fusion.{fusion}"},
            "backbone": {"name": "vit_tiny_patch16_224", "depth": 6, "embed_dim": 128},
        },
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))

    def vals(m):
        return {f"val/{s}/mAP_{k}": m + i for i, s in enumerate(sets) for k in ("M", "H")}

    metrics = {
        "metrics": vals(m_last),
        "best": {"step": 4, "epoch": 0, "metrics": vals(m_best)},
        "last": {"step": 8, "epoch": 1, "metrics": vals(m_last)},
        "global_step": 8,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_collect_reads_nested_new_folders_sets_from_the_metrics_and_best_on_request(tmp_path):
    mod = _collect_module()
    root = tmp_path / "ablation" / "multiruns"
    _new_job(
        root / "s42" / "0_fusion-cross_attention_ablation_backbone-vit6x128", "CrossAttentionFusion", 50, 40
    )
    _new_job(root / "s42" / "1_fusion-hadamard_ablation_backbone-vit6x128", "HadamardFusion", 30, 35)
    made = mod.collect(root, tmp_path / "out")  # the parent of the sweeps: jobs two levels down
    md = made["table"].read_text()
    assert "vit6x128 roxford5k M" in md and "vit6x128 synthetic_heldout H" in md  # no fixed list of sets
    assert "| cross_attention | 40.00 | 40.00 | 41.00 | 41.00 |" in md and "at the last validation" in md
    assert "| hadamard | 35.00 | 35.00 | 36.00 | 36.00 |" in md  # a fusion from conf/model/fusion, by class
    best = mod.collect(root, tmp_path / "out_best", value="best")["table"].read_text()
    assert "| cross_attention | 50.00 | 50.00 | 51.00 | 51.00 |" in best and "at the best validation" in best


def test_ablate_writes_outside_experiments_unless_asked(tmp_path, monkeypatch):
    import importlib.util
    import sys

    sys.path.insert(0, str(REPO / "experiments" / "ablation"))
    spec = importlib.util.spec_from_file_location(
        "ablation_run", REPO / "experiments" / "ablation" / "run.py"
    )
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    calls = {}
    monkeypatch.setattr(
        run, "collect", lambda dirs, out, **kw: calls.update(out=out) or {"table": out, "plot": out}
    )
    monkeypatch.setattr(
        sys, "argv", ["run.py", "--collect-only", "--log-dir", str(tmp_path), "--name", "small"]
    )
    run.main()
    assert calls["out"] == tmp_path / "ablation" / "multiruns" / "small"
    assert "experiments" not in str(calls["out"].relative_to(tmp_path))
    monkeypatch.setattr(
        sys, "argv", ["run.py", "--collect-only", "--log-dir", str(tmp_path), "--out", "here"]
    )
    run.main()
    assert calls["out"] == Path("here")
