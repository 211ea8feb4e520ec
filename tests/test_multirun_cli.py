"""`python src/train.py data=gldv2 data.root=<folder> -m <sweep>` runs one job per value (Hydra multirun)."""

import subprocess
import sys

from omegaconf import OmegaConf

from .conftest import LANDMARKS_MINI, REPO


def test_multirun_over_two_fusions_on_a_gldv2_folder(tiny_synthetic, tmp_path):
    # the tiny synthetic set is a folder in the GLDv2 layout, read here through data=gldv2 like a real download
    cmd = [
        sys.executable,
        str(REPO / "src" / "train.py"),
        "-m",
        "model=dalg_tiny",
        "data=gldv2",
        f"data.root={tiny_synthetic}",
        "model/fusion=cross_attention,orthogonal",
        "data.num_workers=0",
        "data.batch_size=8",
        "data.train_size=64",
        "data.eval_sets.landmarks_mini.test_size=64",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "validate_before_fit=false",
        "logger=csv",
        "callbacks.rich_progress_bar=null",
        "trainer.enable_progress_bar=false",
        f"paths.log_dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(
        p.parent for p in (tmp_path / "train" / "multiruns").rglob("config.yaml") if p.parent.name != ".hydra"
    )
    assert len(runs) == 2, runs
    fusions = sorted(OmegaConf.load(r / "config.yaml").model.fusion._target_.rsplit(".", 1)[1] for r in runs)
    assert fusions == ["CrossAttentionFusion", "OrthogonalFusion"]
    for run in runs:
        assert (run / "checkpoints" / "last.ckpt").is_file()
        metrics = (run / "csv" / "metrics.csv").read_text()
        if LANDMARKS_MINI.exists():
            assert "val/landmarks_mini/mAP_M" in metrics
