"""Whitening (dalg.retrieval.whitening): the learnt projections' defining properties, retrieval gains on data built
to need them, safe files, and refusal of descriptors it was not learnt for."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dalg.retrieval.whitening import (
    Whitening,
    class_pairs,
    learn_lw,
    learn_pca,
    load_whitening,
    save_whitening,
    whiten_descriptors,
    whitening_from_arrays,
    whitening_of_store,
    whitening_paths,
)
from tests.test_retrieval_eval import tiny_ckpt  # noqa: F401  (fixture)


def _cov(x: np.ndarray) -> np.ndarray:
    xc = x - x.mean(0)
    return xc.T @ xc / len(x)


def _correlated(n: int = 400, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)


def test_pca_whitening_gives_identity_covariance_and_power_zero_a_rotation():
    x = _correlated()
    mean, proj, _ = learn_pca(x)
    np.testing.assert_allclose(mean, x.mean(0), atol=1e-12)
    np.testing.assert_allclose(proj @ _cov(x) @ proj.T, np.eye(16), atol=1e-8)
    _, rot, _ = learn_pca(x, power=0.0)
    np.testing.assert_allclose(rot @ rot.T, np.eye(16), atol=1e-8)
    variances = np.diag(rot @ _cov(x) @ rot.T)
    assert np.all(np.diff(variances) <= 1e-9)  # principal axes, largest variance first


def test_pca_shrinkage_and_dim():
    x = _correlated()
    _, full, _ = learn_pca(x, shrinkage=1.0)  # covariance replaced by mean-eigenvalue * I: equal scales
    norms = np.linalg.norm(full, axis=1)
    np.testing.assert_allclose(norms, norms[0], rtol=1e-8)
    _, half, _ = learn_pca(x, shrinkage=0.5)
    out = np.diag(half @ _cov(x) @ half.T)
    assert out.max() / out.min() > 1.5  # partly whitened: variances no longer equal ...
    raw = np.linalg.eigvalsh(_cov(x))
    assert out.max() / out.min() < raw.max() / raw.min()  # ... but flatter than without whitening
    _, proj8, _ = learn_pca(x, dim=8)
    assert proj8.shape == (8, 16)
    with pytest.raises(ValueError, match="dim must be in 1..16"):
        learn_pca(x, dim=17)
    with pytest.raises(ValueError, match="shrinkage"):
        learn_pca(x, shrinkage=1.5)


def test_pca_on_fewer_descriptors_than_dimensions_drops_null_components():
    x = _correlated(n=10, d=32)
    _, proj, info = learn_pca(x)
    assert proj.shape[0] == 9  # 10 centred points span 9 dimensions
    assert np.isfinite(proj).all() and info["dropped_null_components"] == 32 - 9
    with pytest.raises(ValueError, match="no variance"):
        learn_pca(np.ones((5, 4)))


def _nuisance_classes(seed: int, classes: int = 40, per_class: int = 6, d: int = 24):
    """Class centres with small spread in every direction, plus strong within-class noise in a 6-d subspace: the
    nearest neighbour is dominated by the nuisance until it is whitened away."""
    basis = np.linalg.qr(np.random.default_rng(100).normal(size=(d, 6)))[
        0
    ]  # one nuisance subspace for all sets
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d))
    labels = np.repeat(np.arange(classes), per_class)
    x = centres[labels] * 0.3 + rng.normal(size=(len(labels), 6)) @ basis.T * 3.0
    x += rng.normal(size=x.shape) * 0.05
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def _nn_accuracy(x: np.ndarray, labels: np.ndarray) -> float:
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return float((labels[sim.argmax(1)] == labels).mean())


def test_learnt_whitening_defining_properties_and_retrieval_gain():
    x, labels = _nuisance_classes(seed=0)
    pairs = class_pairs(labels)
    mean, proj, info = learn_lw(x, pairs)
    diff = x[pairs[:, 0]] - x[pairs[:, 1]]
    np.testing.assert_allclose(proj @ (diff.T @ diff / len(diff)) @ proj.T, np.eye(24), atol=1e-6)
    rotated = (x - mean) @ proj.T
    cd = rotated.T @ rotated / len(x)
    np.testing.assert_allclose(cd, np.diag(np.diag(cd)), atol=1e-6)  # decorrelated, ...
    assert np.all(np.diff(np.diag(cd)) <= 1e-9)  # ... largest inter-class variance first
    assert info["pairs"] == len(pairs) == 40 * 15

    test_x, test_labels = _nuisance_classes(seed=1)  # other classes: learnt once, applied to unseen data
    lw = whitening_from_arrays(mean, proj, {})
    pca = whitening_from_arrays(*learn_pca(x)[:2], {})
    raw_acc, lw_acc, pca_acc = (
        _nn_accuracy(test_x, test_labels),
        _nn_accuracy(lw.apply(test_x), test_labels),
        _nn_accuracy(pca.apply(test_x), test_labels),
    )
    assert lw_acc > raw_acc + 0.3, (raw_acc, lw_acc)
    assert lw_acc > pca_acc, (pca_acc, lw_acc)  # the pairs say which directions are nuisance; PCA cannot


def test_lw_rank_deficient_pairs_need_shrinkage():
    x, labels = _nuisance_classes(seed=0, classes=3, per_class=3)  # 9 pairs for 24 dimensions
    pairs = class_pairs(labels)
    with pytest.raises(ValueError, match="rank .* shrinkage > 0"):
        learn_lw(x, pairs)
    _, proj, _ = learn_lw(x, pairs, shrinkage=0.1)
    assert np.isfinite(proj).all() and proj.shape[1] == 24
    with pytest.raises(ValueError, match="pair indices"):
        learn_lw(x, np.array([[0, 99]]))


def test_class_pairs_all_or_capped_and_never_across_classes():
    labels = [0, 0, 0, 1, 2, 2, 0]
    pairs = class_pairs(labels)
    assert {tuple(p) for p in pairs} == {(0, 1), (0, 2), (0, 6), (1, 2), (1, 6), (2, 6), (4, 5)}
    capped = class_pairs(labels, max_pairs_per_class=2, seed=3)
    assert len(capped) == 3 and all(labels[i] == labels[j] for i, j in capped)
    np.testing.assert_array_equal(capped, class_pairs(labels, max_pairs_per_class=2, seed=3))
    with pytest.raises(ValueError, match="no class has two images"):
        class_pairs([0, 1, 2])


def _saved(tmp_path, method: str = "pca") -> Whitening:
    x = _correlated()
    w = whitening_from_arrays(*learn_pca(x, dim=8)[:2], {"method": method, "checkpoint_sha256": "ab" * 32})
    save_whitening(tmp_path / "w", w)
    return w


def test_save_load_roundtrip_and_apply(tmp_path):
    w = _saved(tmp_path)
    npz, js = whitening_paths(tmp_path / "w")
    assert npz.exists() and js.exists()
    back = load_whitening(tmp_path / "w.npz")
    np.testing.assert_array_equal(back.projection, w.projection)
    assert back.meta["method"] == "pca" and back.sha256 == w.sha256 and back.describe()["dim"] == [16, 8]
    x = _correlated(n=50, seed=5)
    out = whiten_descriptors(x.astype(np.float16), back, "queries", "ab" * 32)
    assert out.shape == (50, 8) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        back.apply(x, chunk_size=7), back.apply(x), atol=1e-6
    )  # chunking changes nothing
    assert whiten_descriptors(x, None, "queries") is x


def test_refuses_descriptors_of_another_checkpoint_or_size(tmp_path):
    w = load_whitening(_saved(tmp_path).path)
    with pytest.raises(ValueError, match=r"w\.npz was learnt on 16-d descriptors; database are 12-d"):
        whiten_descriptors(np.zeros((3, 12)), w, "database")
    with pytest.raises(ValueError, match=r"w\.npz was learnt on descriptors of checkpoint sha256 abab"):
        whiten_descriptors(np.ones((3, 16)), w, "distractors", "cd" * 32)


def test_damaged_or_hostile_files_are_refused_naming_them(tmp_path):
    _saved(tmp_path)
    npz, js = whitening_paths(tmp_path / "w")
    with pytest.raises(FileNotFoundError, match="no missing.json"):
        load_whitening(tmp_path / "missing")
    info = json.loads(js.read_text())
    js.write_text(json.dumps({**info, "format": "something-else"}))
    with pytest.raises(ValueError, match="w.json is not a dalg-whitening v1 file"):
        load_whitening(npz)
    js.write_text("{not json")
    with pytest.raises(ValueError, match="w.json cannot be read"):
        load_whitening(npz)

    # a pickled object array with a matching sha256 in the json: refused, never unpickled
    marker = tmp_path / "marker"
    np.savez(npz, mean=np.array([_Boom(str(marker))], dtype=object), projection=np.zeros((2, 1)))
    import hashlib

    js.write_text(json.dumps({**info, "npz_sha256": hashlib.sha256(npz.read_bytes()).hexdigest()}))
    with pytest.raises(ValueError, match="w.npz cannot be read"):
        load_whitening(npz)
    assert not marker.exists()

    np.savez(npz, mean=np.zeros(16), projection=np.zeros((8, 16)))  # rewritten after the json
    with pytest.raises(ValueError, match="sha256 differs"):
        load_whitening(npz)


class _Boom:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ------------------------------------------------------------------------------------------- src/whiten.py
def _whiten_entry():
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("dalg_whiten_entry", REPO / "src" / "whiten.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_whiten(overrides: list[str], out_dir):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from tests.conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="whiten", overrides=overrides)
        with open_dict(cfg):
            cfg.paths.output_dir = str(out_dir)
        return _whiten_entry().whiten(cfg)  # inside the context: it composes conf/extract.yaml


def test_whiten_cli_learns_lw_and_pca_for_a_checkpoint(tiny_ckpt, tiny_synthetic, tmp_path, capsys):  # noqa: F811
    from dalg.retrieval.features import load_features
    from tests.conftest import tiny_data_overrides

    data = [o for o in tiny_data_overrides(tiny_synthetic) if o.startswith("data.")]
    base = [
        f"ckpt_path={tiny_ckpt}",
        "data=synthetic",
        *data,
        "num_workers=0",
        "accelerator=cpu",
        "test_size=64",
    ]
    out = _run_whiten([*base, "method=lw", f"output={tmp_path / 'lw'}", "max_images_per_class=3"], tmp_path)
    w = load_whitening(out)
    assert w.meta["method"] == "lw" and w.meta["learned_on"]["classes"] == 12
    assert w.meta["learned_on"]["pairs"] == 12 * 3  # 3 images per class: 3 pairs each
    store = load_features(tmp_path / "lw.descriptors")
    assert len(store) == 36 and w.meta["descriptor_fingerprint"] == store.meta["fingerprint"]
    assert w.meta["checkpoint_sha256"] == store.meta["fingerprint"]["checkpoint_sha256"]
    assert "lw.npz" in capsys.readouterr().out
    # applied to this checkpoint's descriptors: unit rows; another checkpoint's: refused
    whitened = whiten_descriptors(store.features, w, "database", w.meta["checkpoint_sha256"])
    np.testing.assert_allclose(np.linalg.norm(whitened, axis=1), 1.0, atol=1e-5)

    pca = load_whitening(
        _run_whiten(
            [
                *base,
                "method=pca",
                f"features={tmp_path / 'lw.descriptors'}",
                f"output={tmp_path / 'pca'}",
                "dim=16",
                f"attach_to=[{tmp_path / 'lw.descriptors'}]",
            ],
            tmp_path,
        )
    )
    assert (
        pca.dim_out == 16 and pca.meta["options"]["power"] == 0.5 and pca.meta["learned_on"]["images"] == 36
    )
    # recorded in the store's metadata (for search); a replaced whitening file is noticed
    named = whitening_of_store(load_features(tmp_path / "lw.descriptors").meta, "store lw.descriptors")
    assert named.sha256 == pca.sha256 and named.dim_out == 16
    save_whitening(tmp_path / "pca", whitening_from_arrays(pca.mean, pca.projection * 2, pca.meta))
    with pytest.raises(ValueError, match="store lw.descriptors names whitening .* it was replaced"):
        whitening_of_store(load_features(tmp_path / "lw.descriptors").meta, "store lw.descriptors")

    _eval_with_whitening(tiny_ckpt, tiny_synthetic, tmp_path, tmp_path / "lw.npz")

    with pytest.raises(ValueError, match="method=lw learns from the training classes"):
        _run_whiten([*base, "method=lw", f"features={tmp_path / 'lw.descriptors'}"], tmp_path)
    with pytest.raises(ValueError, match="method='zca'"):
        _run_whiten([*base, "method=zca"], tmp_path)


def _eval_with_whitening(ckpt, root, tmp_path, whitening_path) -> None:
    """src/eval.py whitening=: the scores are those of the whitened descriptors (independent search + metric),
    the protocol names the whitening, distractors are whitened too, another checkpoint is refused."""
    import torch

    import dalg.data.revisited as rv
    from dalg.retrieval.features import load_features, save_features
    from dalg.retrieval.index import search
    from dalg.retrieval.metrics import evaluate_revisited
    from tests.test_retrieval_eval import _compose_eval, _eval_module, _overrides

    dis = np.random.default_rng(0).standard_normal((50, 512)).astype(np.float32)
    save_features(
        tmp_path / "dis", dis / np.linalg.norm(dis, axis=1, keepdims=True), [f"d{i}" for i in range(50)]
    )
    over = _overrides(ckpt, root) + [
        f"whitening={whitening_path}",
        "save_features=true",
        f"output_json={tmp_path / 'ev' / 'r.json'}",
        f"distractors={tmp_path / 'dis'}",
    ]
    _eval_module().evaluate(_compose_eval(over, tmp_path))
    res = json.loads((tmp_path / "ev" / "r.json").read_text())["sets"]["synthetic_heldout"]
    assert res["protocol"]["whitening"]["method"] == "lw" and res["protocol"]["distractors"] == 50
    w = load_whitening(whitening_path)
    q = w.apply(load_features(tmp_path / "ev" / "features" / "synthetic_heldout_queries").features)
    db = w.apply(load_features(tmp_path / "ev" / "features" / "synthetic_heldout_database").features)
    gt = rv.load_ground_truth(root / "heldout", "synthetic-heldout")
    _, ranks = search(q, [db, w.apply(load_features(tmp_path / "dis").features)])
    for key, value in evaluate_revisited(ranks, gt.gnd, n_database=len(db) + 50).as_dict().items():
        assert res["scores"][key] == pytest.approx(value, abs=0.06), (
            key
        )  # fp16 stores: tiny rank swaps at most

    other = torch.load(ckpt, map_location="cpu", weights_only=True)
    key = next(k for k, v in other["state_dict"].items() if v.is_floating_point())
    other["state_dict"][key] += 1
    torch.save(other, tmp_path / "other.ckpt")
    over = [o for o in over if not o.startswith("ckpt_path=")] + [f"ckpt_path={tmp_path / 'other.ckpt'}"]
    with pytest.raises(ValueError, match=r"lw\.npz was learnt on descriptors of checkpoint sha256"):
        _eval_module().evaluate(_compose_eval(over, tmp_path))
