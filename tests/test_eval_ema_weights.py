"""A run trained with an EMA of its weights validates (and picks its best checkpoint by) the average, while the
checkpoint's state_dict keeps the raw weights training resumes from. Evaluation must score what the run reported:
the average by default (``weights=auto``), the raw weights on request, a clear refusal for ``weights=ema``
without an average."""

from __future__ import annotations

import pytest
import torch

from dalg.lit.checkpoint_read import CheckpointError, read_checkpoint
from dalg.lit.ema import ema_shadow
from dalg.lit.module import RetrievalModule
from dalg.train_pipeline import train
from tests.conftest import compose_train, tiny_data_overrides
from tests.test_retrieval_eval import _compose_eval, _eval_module, _overrides

M = "val/synthetic_heldout/mAP_M"


@pytest.fixture(scope="module")
def ema_run(tiny_synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("ema_run")
    cfg = compose_train(
        tiny_data_overrides(tiny_synthetic)
        + [
            "~data.eval_sets.landmarks_mini",
            "callbacks=with_ema",
            "callbacks.ema.decay=0.5",  # an average far from the raw weights after a few steps
            "callbacks.ema.apply_at_end=false",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=4",
            "trainer.enable_progress_bar=false",
            "callbacks.rich_progress_bar=null",
            "validate_before_fit=false",
            "logger=csv",  # no W&B service process left behind for later tests
        ],
        out,
    )
    return train(cfg), out


def test_eval_scores_the_average_the_run_validated(ema_run, tiny_synthetic, tmp_path):
    result, out = ema_run
    last = out / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(last)
    shadow = ema_shadow(ckpt)
    assert shadow, "the run saved no EMA average"
    assert "the EMA average the validations used" in (out / "train.log").read_text()  # the outputs say so
    raw = RetrievalModule.from_checkpoint_dict(ckpt, last, "raw")
    auto = RetrievalModule.from_checkpoint_dict(ckpt, last)
    assert raw.weights_source == "raw" and auto.weights_source == "ema"
    k = next(k for k in shadow if k.endswith("weight") and shadow[k].dim() > 1)
    assert torch.equal(auto.net.state_dict()[k], shadow[k])
    assert not torch.allclose(raw.net.state_dict()[k], shadow[k])  # the two really differ

    ev = _eval_module()
    scores = {}
    for weights in ("auto", "raw"):
        cfg = _compose_eval(_overrides(last, tiny_synthetic) + [f"weights={weights}"], tmp_path / weights)
        report = ev.evaluate(cfg)
        scores[weights] = report["sets"]["synthetic_heldout"]["scores"]["mAP_M"]
        assert report["sets"]["synthetic_heldout"]["protocol"]["weights"] == (
            "ema" if weights == "auto" else "raw"
        )
    # the run's own last validation (same set, same test size, same weights) is what eval.py gives by default
    assert scores["auto"] == pytest.approx(result["last"]["metrics"][M], abs=1e-3), scores
    # ... and the raw weights, what evaluation used to load, score another model (58.6 vs 37.8 when written)
    assert abs(scores["raw"] - scores["auto"]) > 1.0, scores


def test_weights_choice_is_checked(ema_run, tiny_synthetic):
    _, out = ema_run
    last = out / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(last)
    with pytest.raises(ValueError, match="weights='best'"):
        RetrievalModule.from_checkpoint_dict(ckpt, last, "best")
    no_ema = {**ckpt, "callbacks": {}}
    assert RetrievalModule.from_checkpoint_dict(no_ema, last).weights_source == "raw"  # auto falls back
    with pytest.raises(CheckpointError, match="no EMA average"):
        RetrievalModule.from_checkpoint_dict(no_ema, last, "ema")
    shadow = ema_shadow(ckpt)
    broken = {
        **ckpt,
        "callbacks": {"EMAWeights": {"decay": 0.5, "shadow": {**shadow, "net.extra": torch.ones(1)}}},
    }
    with pytest.raises(CheckpointError, match="does not fit"):
        RetrievalModule.from_checkpoint_dict(broken, last)


def test_store_records_the_average_and_search_extracts_queries_alike(ema_run, tmp_path):
    """extract.py with an EMA checkpoint: the store's fingerprint says "ema" (a raw-weights store of the same
    checkpoint is another extraction), and search.py extracts its queries with the same weights."""
    import shutil

    import numpy as np
    from PIL import Image

    from dalg.retrieval.features import load_features
    from tests.conftest import compose_config, load_entry

    _, out = ema_run
    last = out / "checkpoints" / "last.ckpt"
    rng = np.random.default_rng(0)
    (tmp_path / "db").mkdir()
    for i in range(4):
        img = rng.integers(0, 255, (36, 48, 3), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / "db" / f"img{i}.jpg")
    common = [f"ckpt_path={last}", f"images={tmp_path / 'db'}", "test_size=48", "num_workers=0"]
    common += ["trainer.accelerator=cpu", "batch_size=4", "dtype=float32"]
    extract = load_entry("extract")
    stores = {}
    for weights in ("auto", "raw"):
        stem = tmp_path / f"feats_{weights}"
        cfg = compose_config(
            "extract", [*common, f"output={stem}", f"weights={weights}"], tmp_path / f"x_{weights}"
        )
        extract.extract(cfg)
        stores[weights] = load_features(stem)
    assert stores["auto"].meta["fingerprint"]["weights"] == "ema"
    assert "weights" not in stores["raw"].meta["fingerprint"]  # as every store written before the choice
    assert not np.allclose(stores["auto"].features, stores["raw"].features)

    # +1M distractors and whitening must come from the same weights of the same checkpoint as the evaluation
    from dalg import eval_pipeline as pipeline

    dim = stores["auto"].features.shape[1]
    rows, _ = pipeline.ranking_inputs(str(tmp_path / "feats_auto"), None, str(last), dim, "ema")
    assert rows.shape == (4, dim)
    with pytest.raises(ValueError, match="ema weights of the checkpoint, the evaluation uses its raw"):
        pipeline.ranking_inputs(str(tmp_path / "feats_auto"), None, str(last), dim, "raw")
    other = tmp_path / "other.ckpt"
    other.write_bytes(last.read_bytes() + b"another checkpoint")
    with pytest.raises(ValueError, match="extracted with checkpoint sha256"):
        pipeline.ranking_inputs(str(tmp_path / "feats_raw"), None, str(other), dim, "raw")
    from dalg.retrieval.whitening import Whitening

    learnt = {"descriptor_fingerprint": stores["auto"].meta["fingerprint"]}
    white = Whitening(np.zeros(dim, np.float32), np.eye(dim, dtype=np.float32), meta=learnt)
    white.check_applies(dim, None, "the queries", "ema")
    with pytest.raises(ValueError, match="learnt on descriptors of the ema weights"):
        white.check_applies(dim, None, "the queries", "raw")

    queries = tmp_path / "q"
    queries.mkdir()
    shutil.copyfile(tmp_path / "db" / "img2.jpg", queries / "img2.jpg")
    search = load_entry("search")
    for weights in ("auto", "raw"):
        over = [
            f"index={tmp_path / f'feats_{weights}'}",
            f"query={queries}",
            "trainer.accelerator=cpu",
            "top_k=2",
        ]
        over += ["report.attention_size=48"]
        res = search.run_search(compose_config("search", over, tmp_path / f"s_{weights}"))
        top = res["queries"][0]["results"][0]
        # the query is a copy of a stored image: found first, with the score of identical descriptors
        assert top["name"].endswith("img2.jpg") and top["score"] == pytest.approx(1.0, abs=1e-4), (
            weights,
            top,
        )


def test_whitening_of_the_other_weights_is_not_attached_to_a_store(tmp_path):
    import numpy as np

    from dalg.retrieval.features import save_features
    from dalg.retrieval.whitening import Whitening, attach_to_store

    dim = 8
    rows = np.eye(dim, dtype=np.float32)
    fingerprint = {"checkpoint_sha256": "ab" * 32, "weights": "ema"}
    save_features(
        tmp_path / "ema_store", rows, [f"{i}.jpg" for i in range(dim)], meta={"fingerprint": fingerprint}
    )
    raw_learnt = {"checkpoint_sha256": "ab" * 32, "descriptor_fingerprint": {"checkpoint_sha256": "ab" * 32}}
    white = Whitening(np.zeros(dim, np.float32), np.eye(dim, dtype=np.float32), meta=raw_learnt)
    with pytest.raises(ValueError, match="learnt on descriptors of the raw weights"):
        attach_to_store(tmp_path / "ema_store", white)
    white.meta["descriptor_fingerprint"] = fingerprint  # learnt on the same (EMA) descriptors: attached
    assert attach_to_store(tmp_path / "ema_store", white).is_file()
