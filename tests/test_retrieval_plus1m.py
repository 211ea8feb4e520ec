"""The README's +1M recipe end to end on a small stand-in for revisitop1m (a few dozen generated distractors):

python src/extract.py ckpt_path=<ckpt> images=<distractor folder> output=<stem> dtype=float16
python src/eval.py ckpt_path=<ckpt> data=landmarks_mini distractors=<stem>.npy ranking.top_k=<k>
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalg.retrieval.features import load_features
from tests.conftest import LANDMARKS_MINI
from tests.conftest import compose_config as _compose
from tests.conftest import load_entry as _entry
from tests.test_retrieval_eval import tiny_ckpt  # noqa: F401  (fixture: a checkpoint made in the test)

N_DISTRACTORS = 36
# small images, no workers
FAST = ["test_size=64", "num_workers=0", "trainer.accelerator=cpu", "batch_size=16"]


def _distractors(folder: Path) -> None:
    """Photo-like JPEGs of several sizes and aspect ratios in nested folders, as revisitop1m's jpg/ has."""
    rng = np.random.default_rng(0)
    for k in range(N_DISTRACTORS):
        w, h = [(96, 72), (72, 96), (80, 80), (120, 64)][k % 4]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (k % 7 + 1)) % 256, (yy * (k % 5 + 2)) % 256, (xx + 2 * yy + 9 * k) % 256], -1)
        path = folder / f"{k % 3}" / f"d{k:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)).save(path)


@pytest.mark.skipif(not (LANDMARKS_MINI / "gnd_landmarks-mini.pkl").is_file(), reason="needs ../shared/data")
def test_plus_1m_recipe_end_to_end(tiny_ckpt, tmp_path) -> None:  # noqa: F811
    _distractors(tmp_path / "r1m" / "jpg")
    stem = tmp_path / "feats" / "r1m"
    store_path = _entry("extract").extract(
        _compose(
            "extract",
            [
                f"ckpt_path={tiny_ckpt}",
                f"images={tmp_path / 'r1m' / 'jpg'}",
                f"output={stem}",
                "dtype=float16",
                *FAST,
            ],
            tmp_path / "extract_run",
        )
    )
    assert Path(store_path) == stem.with_suffix(".npy")
    store = load_features(stem.with_suffix(".npy"))
    assert len(store) == N_DISTRACTORS and store.features.dtype == np.float16

    evaluate = _entry("eval").evaluate
    top_k = 40  # shorter than database + distractors: the truncated ranking of the +1M recipe
    common = [f"ckpt_path={tiny_ckpt}", "data=landmarks_mini", f"ranking.top_k={top_k}", *FAST]
    evaluate(
        _compose(
            "eval",
            [*common, f"distractors={stem}.npy", f"output_json={tmp_path / 'plus.json'}"],
            tmp_path / "eval_plus",
        )
    )
    evaluate(_compose("eval", [*common, f"output_json={tmp_path / 'plain.json'}"], tmp_path / "eval_plain"))
    plus = json.loads((tmp_path / "plus.json").read_text())["sets"]["landmarks_mini"]
    plain = json.loads((tmp_path / "plain.json").read_text())["sets"]["landmarks_mini"]

    assert plus["protocol"]["distractors"] == N_DISTRACTORS and plain["protocol"]["distractors"] == 0
    assert plus["protocol"]["database"] == plain["protocol"]["database"] > 0
    assert plus["protocol"]["ranking"].startswith(f"top-{top_k}")
    for key in ("mAP_E", "mAP_M", "mAP_H"):  # distractors can only push positives down
        assert plus["scores"][key] <= plain["scores"][key] + 1e-9, key
    # and they did enter the rankings: some query's AP dropped
    before = np.array([np.nan if v is None else v for v in plain["per_query_ap"]["M"]], float)
    after = np.array([np.nan if v is None else v for v in plus["per_query_ap"]["M"]], float)
    assert np.nanmax(before - after) > 0
