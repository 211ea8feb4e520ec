"""src/eval.py end to end on a tiny checkpoint and the tiny synthetic Revisited set (seconds on CPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from dalg.retrieval.features import load_features, save_features
from dalg.retrieval.index import search
from dalg.retrieval.metrics import evaluate_revisited
from dalg.train_pipeline import build_module
from tests.conftest import CONF, REPO, TINY_SYNTHETIC, compose_train


def _eval_module():
    spec = importlib.util.spec_from_file_location("dalg_eval_entry", REPO / "src" / "eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt")
    module = build_module(compose_train(["model=dalg_tiny"], out), num_classes=5)
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, accelerator="cpu", enable_model_summary=False
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(out / "tiny.ckpt")
    return out / "tiny.ckpt"


def _compose_eval(overrides: list[str], out: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def _overrides(ckpt: Path, root: Path) -> list[str]:
    return [
        f"ckpt_path={ckpt}",
        "data=synthetic",
        f"data.root={root}",
        "~data.eval_sets.landmarks_mini",
        "test_size=64",
        "num_workers=0",
        "batch_size=8",
        "trainer.accelerator=cpu",
    ] + [f"data.generator.{k}={v}" for k, v in TINY_SYNTHETIC.items()]


def test_eval_table_json_and_protocol(tiny_ckpt, tiny_synthetic, tmp_path) -> None:
    ev = _eval_module()
    cfg = _compose_eval(_overrides(tiny_ckpt, tiny_synthetic) + ["save_features=true"], tmp_path)
    report = ev.evaluate(cfg)
    on_disk = json.loads((tmp_path / "eval_results.json").read_text())
    assert on_disk["sets"].keys() == {"synthetic_heldout"}
    res = on_disk["sets"]["synthetic_heldout"]
    assert res["protocol"]["crop_queries"] is True and res["protocol"]["scales"] == [1.0]
    assert res["protocol"]["ranking"] == "full" and res["truncated"] is False
    assert set(res["scores"]) >= {"mAP_E", "mAP_M", "mAP_H", "mP@1_M", "mP@10_H"}
    assert report["sets"]["synthetic_heldout"]["scores"] == res["scores"]
    ex = on_disk["extraction"]  # every image of the set, timed
    assert ex["images"] == 5 + 5 * 4 + 4 and ex["seconds"] > 0 and ex["images_per_s"] > 0
    assert ex["inference"] == "fp32" and ex["device"] == "cpu"

    # the scores equal an independent search + metric over the descriptors the run saved
    q = load_features(tmp_path / "features" / "synthetic_heldout_queries")
    db = load_features(tmp_path / "features" / "synthetic_heldout_database")
    import dalg.data.revisited as rv

    gt = rv.load_ground_truth(tiny_synthetic / "heldout", "synthetic-heldout")
    _, ranks = search(np.asarray(q.features, np.float32), np.asarray(db.features, np.float32))
    expected = evaluate_revisited(ranks, gt.gnd).as_dict()
    for key, value in expected.items():
        assert res["scores"][key] == pytest.approx(value, abs=0.06), (
            key
        )  # fp16 stores: tiny rank swaps at most


def test_eval_uncropped_multiscale_with_distractors(tiny_ckpt, tiny_synthetic, tmp_path) -> None:
    ev = _eval_module()
    rng = np.random.default_rng(0)
    dis = rng.standard_normal((300, 512)).astype(np.float32)
    dis /= np.linalg.norm(dis, axis=1, keepdims=True)
    save_features(tmp_path / "distractors", dis, [f"d{i}" for i in range(300)])
    over = _overrides(tiny_ckpt, tiny_synthetic) + [
        "crop_queries=false",
        "scales=[0.75,1.0]",
        f"distractors={tmp_path / 'distractors.npy'}",
        "ranking.top_k=20",
        f"output_json={tmp_path / 'r.json'}",
    ]
    ev.evaluate(_compose_eval(over, tmp_path))
    res = json.loads((tmp_path / "r.json").read_text())["sets"]["synthetic_heldout"]
    assert res["protocol"]["crop_queries"] is False and res["protocol"]["scales"] == [0.75, 1.0]
    assert res["protocol"]["distractors"] == 300 and res["truncated"] is True
    assert res["protocol"]["ranking"].startswith("top-20")


def test_eval_missing_checkpoint(tmp_path, tiny_synthetic) -> None:
    ev = _eval_module()
    cfg = _compose_eval(_overrides(tmp_path / "nope.ckpt", tiny_synthetic), tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        ev.evaluate(cfg)


def test_eval_inference_options(tiny_ckpt, tiny_synthetic, tmp_path) -> None:
    """Extraction through dalg.inference: float32 options reproduce the network's own extract; bf16 stays close;
    the options used are written into the protocol; an unknown option is an error naming it."""
    ev = _eval_module()

    def run(extra: list[str], name: str) -> tuple[dict, np.ndarray]:
        out = tmp_path / name
        cfg = _compose_eval(_overrides(tiny_ckpt, tiny_synthetic) + ["save_features=true"] + extra, out)
        res = ev.evaluate(cfg)["sets"]["synthetic_heldout"]
        feats = load_features(out / "features" / "synthetic_heldout_database").features
        return res, np.asarray(feats, np.float32)

    plain, f_plain = run(["~inference"], "plain")
    fp32, f_fp32 = run([], "fp32")  # the default: inference.bf16=false
    bf16, f_bf16 = run(["inference.bf16=true"], "bf16")
    assert plain["protocol"]["inference"] == "fp32 (model.extract)"
    assert fp32["protocol"]["inference"] == "fp32" and bf16["protocol"]["inference"] == "bf16"
    np.testing.assert_allclose(f_fp32, f_plain, atol=2e-3)  # fp16 stores
    assert fp32["scores"] == pytest.approx(plain["scores"], abs=1e-6)
    assert float((f_bf16 * f_plain).sum(1).min()) > 0.99
    assert not np.array_equal(f_bf16, f_plain)  # bf16 really ran

    cfg = _compose_eval(_overrides(tiny_ckpt, tiny_synthetic) + ["+inference.fast=true"], tmp_path)
    with pytest.raises(ValueError, match=r"inference options \['fast'\] are unknown"):
        ev.evaluate(cfg)


def test_eval_rerank_with_distractors(tiny_ckpt, tiny_synthetic, tmp_path) -> None:
    """``ranking.rerank=true`` through src/eval.py: the database reaches the re-ranker in parts (the set's own
    images, then the distractors); the scores equal re-ranking the run's own descriptors independently."""
    from dalg.retrieval.index import rank_by_similarity
    from dalg.retrieval.rerank import rerank_topk

    ev = _eval_module()
    rng = np.random.default_rng(1)
    dis = rng.standard_normal((40, 512)).astype(np.float32)
    dis /= np.linalg.norm(dis, axis=1, keepdims=True)
    save_features(tmp_path / "distractors", dis, [f"d{i}" for i in range(40)], dtype="float32")
    over = _overrides(tiny_ckpt, tiny_synthetic) + [
        f"distractors={tmp_path / 'distractors.npy'}",
        "ranking.rerank=true",
        "ranking.rerank_k=15",
        "ranking.top_k=30",  # a truncated shortlist of the 24 + 40 images, re-ordered in its first 15
        "save_features=true",
    ]
    res = ev.evaluate(_compose_eval(over, tmp_path))["sets"]["synthetic_heldout"]
    assert res["protocol"]["rerank"].startswith("alpha-QE") and res["protocol"]["distractors"] == 40

    q = np.asarray(load_features(tmp_path / "features" / "synthetic_heldout_queries").features, np.float32)
    db = np.asarray(load_features(tmp_path / "features" / "synthetic_heldout_database").features, np.float32)
    full = np.concatenate([db, dis])
    ranks = rank_by_similarity(q @ full.T)[:, :30]
    ranks = rerank_topk(q, full, ranks, k=15, qe_n=2, dba_n=2, alpha=3.0)
    import dalg.data.revisited as rv

    gt = rv.load_ground_truth(tiny_synthetic / "heldout", "synthetic-heldout")
    expected = evaluate_revisited(ranks, gt.gnd, n_database=full.shape[0]).as_dict()
    for key, value in expected.items():
        assert res["scores"][key] == pytest.approx(value, abs=0.06), (
            key
        )  # fp16 stores: tiny rank swaps at most
