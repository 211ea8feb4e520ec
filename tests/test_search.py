"""src/search.py: your own photos against a feature store made by src/extract.py with a tiny checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from dalg.data.images import ImageReadError
from dalg.retrieval.features import load_features
from dalg.train_pipeline import build_module
from tests.conftest import REPO, compose_train
from tests.conftest import compose_config as _compose
from tests.conftest import load_entry as _entry
from tests.test_retrieval_eval import tiny_ckpt  # noqa: F401  (fixture: a checkpoint made in the test)

SIZES = [(40, 30), (30, 40), (40, 30), (32, 32), (48, 36), (36, 48)]


@pytest.fixture(scope="module")
def store(tiny_ckpt, tmp_path_factory):  # noqa: F811
    """A float16 store of six photo-like images in nested folders, extracted with the tiny checkpoint."""
    root = tmp_path_factory.mktemp("search")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (i + 2)) % 256, (yy * (i + 3)) % 256, (xx + yy * i) % 256], -1)
        img = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        path = root / "db" / f"{'sub/' if i % 2 else ''}img{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=95)
    stem = root / "feats" / "db"
    over = [f"ckpt_path={tiny_ckpt}", f"images={root / 'db'}", f"output={stem}", "dtype=float16"]
    over += ["test_size=48", "num_workers=0", "trainer.accelerator=cpu", "batch_size=4"]
    _entry("extract").extract(_compose("extract", over, root / "extract_run"))
    return stem, root


def _search_cfg(stem: Path, query: Path, out: Path, *extra: str):
    over = [f"index={stem}", f"query={query}", "trainer.accelerator=cpu", "report.attention_size=48", *extra]
    return _compose("search", over, out)


def test_search_a_folder_ranks_the_store_as_brute_force(store, tmp_path) -> None:
    stem, root = store
    queries = tmp_path / "mine"
    for name in ("img2.jpg", "sub/img3.jpg"):  # the user's photos: copies of two stored images
        (queries / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / "db" / name, queries / name)
    search = _entry("search")
    out = tmp_path / "out"
    res = search.run_search(_search_cfg(stem, queries, out, "top_k=4"))

    db = load_features(stem)
    assert [q["query"] for q in res["queries"]] == [str(queries / "img2.jpg"), str(queries / "sub/img3.jpg")]
    for q, own in zip(res["queries"], ("img2.jpg", "sub/img3.jpg")):
        # extracted exactly as the store: the copy finds its stored twin first, at cosine 1 (fp16 rows)
        assert q["results"][0]["name"] == own and q["results"][0]["score"] == pytest.approx(1.0, abs=2e-3)
        assert [r["rank"] for r in q["results"]] == [1, 2, 3, 4]
        # and the ranking is the brute-force one over the stored rows
        twin = db.features[db.names.index(own)].astype(np.float32)
        sims = db.features.astype(np.float32) @ twin
        assert [r["name"] for r in q["results"][1:]] == [db.names[i] for i in np.argsort(-sims)[1:4]]
    assert json.loads((out / "results.json").read_text())["queries"] == res["queries"]
    with Image.open(out / "results.png") as grid:
        assert grid.size == (5 * 128, 2 * (128 + 14))  # query + top-4 per row
    page = (out / "report" / "index.html").read_text()
    assert page.count('<tr data-target="') == 2 and page.count('class="tile result"') == 8
    assert "images not shown" not in page  # every stored image was found under the store's folder


@pytest.mark.slow  # a fresh interpreter: ~10 s of imports on 2 cores; run_search is covered by the others
def test_search_one_image_from_the_command_line(store, tmp_path) -> None:
    stem, root = store
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        str(REPO / "src" / "search.py"),
        f"index={stem}.npy",
        f"query={root / 'db' / 'img0.jpg'}",
    ]
    cmd += ["top_k=3", "trainer.accelerator=cpu", "report_html=false", f"hydra.run.dir={out}"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    head = lines.index(f"query {root / 'db' / 'img0.jpg'}")
    rank, score, name = lines[head + 1].split()
    assert (rank, name) == ("1", "img0.jpg") and float(score) == pytest.approx(1.0, abs=2e-3)
    assert len([ln for ln in lines[head + 1 : head + 4] if ln.startswith("  ")]) == 3
    assert "peak RSS" in run.stdout
    assert (out / "results.json").is_file() and (out / "results.png").is_file()
    assert not (out / "report").exists()


def test_whitened_search_equals_brute_force(store, tmp_path) -> None:
    from dalg.retrieval.whitening import Whitening, learn_pca, save_whitening

    stem, root = store
    db = load_features(stem)
    rows = db.features.astype(np.float32)
    mean, proj, _ = learn_pca(rows, dim=4, shrinkage=0.1)
    sha = json.loads(Path(f"{stem}.json").read_text())["meta"]["fingerprint"]["checkpoint_sha256"]
    npz = save_whitening(tmp_path / "w", Whitening(mean, proj, {"method": "pca", "checkpoint_sha256": sha}))
    search = _entry("search")
    res = search.run_search(  # two chunks of 4 and 2 rows: their top-k lists merge
        _search_cfg(
            stem,
            root / "db" / "img2.jpg",
            tmp_path / "o",
            "top_k=5",
            "chunk_size=4",
            f"whitening={npz}",
            "report_html=false",
        )
    )
    white = (rows - mean) @ proj.T
    white /= np.linalg.norm(white, axis=1, keepdims=True)
    q = white[db.names.index("img2.jpg")]  # the query's descriptor is its stored twin's (fp16 rounding aside)
    expect = np.lexsort((np.arange(len(rows)), -(white @ q)))[:5]
    got = res["queries"][0]["results"]
    assert [r["row"] for r in got] == expect.tolist()
    assert [r["score"] for r in got] == pytest.approx((white @ q)[expect], abs=5e-3)
    assert res["whitening"]["method"] == "pca" and res["whitening"]["dim"] == [rows.shape[1], 4]

    # recorded in a store's metadata (src/whiten.py attach_to=): applied without whitening=, unless false
    from dalg.retrieval.whitening import attach_to_store, load_whitening

    copy = tmp_path / "attached"
    for suffix in (".npy", ".names.txt", ".json"):
        shutil.copyfile(f"{stem}{suffix}", f"{copy}{suffix}")
    attach_to_store(copy, load_whitening(npz))
    query = root / "db" / "img2.jpg"
    attached = search.run_search(_search_cfg(copy, query, tmp_path / "a", "top_k=5", "report_html=false"))
    assert [r["row"] for r in attached["queries"][0]["results"]] == expect.tolist()
    off = search.run_search(
        _search_cfg(copy, query, tmp_path / "b", "top_k=5", "whitening=false", "report_html=false")
    )
    assert off["whitening"] is None and off["queries"][0]["results"][0]["name"] == "img2.jpg"

    other = save_whitening(
        tmp_path / "x", Whitening(mean, proj, {"method": "pca", "checkpoint_sha256": "0" * 64})
    )
    with pytest.raises(ValueError, match="learnt on descriptors of checkpoint sha256 000000000000"):
        search.run_search(_search_cfg(stem, root / "db" / "img2.jpg", tmp_path / "o", f"whitening={other}"))


def test_another_checkpoint_is_refused(store, tmp_path) -> None:
    stem, root = store
    other = tmp_path / "other.ckpt"
    module = build_module(compose_train(["model=dalg_tiny", "seed=7"], tmp_path), num_classes=5)
    with torch.no_grad():
        next(module.net.parameters()).add_(1.0)  # other weights, same architecture
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, accelerator="cpu", enable_model_summary=False
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(other)
    search = _entry("search")
    with pytest.raises(
        ValueError, match=r"checkpoint .*other\.ckpt .* is not the one index=.* was extracted with"
    ):
        search.run_search(_search_cfg(stem, root / "db" / "img0.jpg", tmp_path / "o", f"ckpt_path={other}"))


def test_settings_that_extract_differently_are_refused(store, tmp_path) -> None:
    stem, root = store
    copy = tmp_path / "copy"
    for suffix in (".npy", ".names.txt", ".json"):
        shutil.copyfile(f"{stem}{suffix}", f"{copy}{suffix}")
    info = json.loads(Path(f"{copy}.json").read_text())
    info["meta"]["fingerprint"]["transform"] = info["meta"]["fingerprint"]["transform"].replace("48", "64")
    Path(f"{copy}.json").write_text(json.dumps(info))
    search = _entry("search")
    with pytest.raises(
        ValueError, match=r"would not be extracted as the store was .*transform: .*64.* vs .*48"
    ):
        search.run_search(_search_cfg(copy, root / "db" / "img0.jpg", tmp_path / "o"))


def test_bad_paths_are_named(store, tmp_path) -> None:
    stem, root = store
    search = _entry("search")
    img = root / "db" / "img0.jpg"
    with pytest.raises(FileNotFoundError, match=r"query=.*nowhere\.jpg: no such image"):
        search.run_search(_search_cfg(stem, tmp_path / "nowhere.jpg", tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match=r"feature store .*missing\.npy is missing"):
        search.run_search(_search_cfg(tmp_path / "missing", img, tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*gone\.ckpt not found \(ckpt_path\)"):
        search.run_search(_search_cfg(stem, img, tmp_path / "o", f"ckpt_path={tmp_path / 'gone.ckpt'}"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"query=.*empty: no images found"):
        search.run_search(_search_cfg(stem, empty, tmp_path / "o"))
    broken = tmp_path / "broken" / "b.jpg"
    broken.parent.mkdir()
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ImageReadError, match=r"b\.jpg.*query image"):
        search.run_search(_search_cfg(stem, broken.parent, tmp_path / "o"))
    tif = tmp_path / "photo.tif"
    tif.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"query=.*photo\.tif: not an image with extension in"):
        search.run_search(_search_cfg(stem, tif, tmp_path / "o"))
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        search.run_search(_search_cfg(stem, img, tmp_path / "o", "top_k=0"))
