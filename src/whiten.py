"""Learn a whitening of one checkpoint's descriptors (dalg.retrieval.whitening), applied later by eval and search.

    python src/whiten.py ckpt_path=<ckpt> method=lw [data=synthetic|gldv2|folder ...]   # pairs from training classes
    python src/whiten.py ckpt_path=<ckpt> method=pca [features=<feature store>]

Without ``features``, the training images of the data config (at most ``max_images``, ``max_images_per_class``
per class, classes drawn at random with ``seed``) go through src/extract.py into ``<output>.descriptors`` (a
resumable, fingerprinted feature store); ``lw`` pairs images of the same class (``max_pairs_per_class``). With
``features`` (any store of this checkpoint, e.g. a separate image collection), PCA learns from it. The result is
``<output>.npz`` + ``<output>.json``, naming the checkpoint's sha256 and the fingerprint of the descriptors;
``attach_to=[<store>, ...]`` records it in those stores' metadata, where search finds and applies it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, open_dict

import dalg.utils.config  # noqa: F401  (registers ${repo_root:})
from dalg.retrieval.features import load_features
from dalg.retrieval.whitening import (
    METHODS,
    attach_to_store,
    class_pairs,
    learn_lw,
    learn_pca,
    save_whitening,
    whitening_from_arrays,
    whitening_paths,
)
from dalg.utils.atomic import write_text_atomic
from dalg.utils.run_metadata import file_sha256
from dalg.utils.writable import check_writable_file


def _extract_entry():
    """src/extract.py, loaded by path (it is a script beside this one, not a package module)."""
    spec = importlib.util.spec_from_file_location(
        "dalg_extract_entry", Path(__file__).with_name("extract.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def training_images(cfg: DictConfig) -> tuple[Path, list[str], np.ndarray]:
    """(root, image paths relative to it, class labels) of the data config's training images, subsampled by
    ``max_images`` / ``max_images_per_class`` (classes in random order, seeded)."""
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    train = datamodule.train_set
    if train is None:
        raise ValueError(f"data config {cfg.data.get('_target_')} has no training set (data.root is null?)")
    root = Path(datamodule.root)
    rng = np.random.default_rng(int(cfg.seed))
    per_class = cfg.max_images_per_class
    rows: list[int] = []
    for c in rng.permutation(len(train.class_index)):
        members = [int(i) for i in train.class_index[c]]
        if per_class is not None and len(members) > int(per_class):
            members = sorted(rng.choice(members, size=int(per_class), replace=False).tolist())
        if cfg.max_images is not None and len(rows) + len(members) > int(cfg.max_images):
            break
        rows += members
    if not rows:
        raise ValueError(f"max_images={cfg.max_images} leaves no training image")
    names = [os.path.relpath(train.path(i), root) for i in rows]
    labels = np.asarray([int(train.samples.labels[i]) for i in rows])
    return root, names, labels


def _test_size(cfg: DictConfig) -> Any:
    if cfg.test_size is not None:
        return cfg.test_size
    monitor = cfg.data.get("monitor_set")
    spec = cfg.data.get("eval_sets", {}).get(monitor) if monitor else None
    return spec.get("test_size", 512) if spec is not None else 512


def extract_training_descriptors(cfg: DictConfig, ckpt: Path, out_stem: Path) -> tuple[Path, dict[str, int]]:
    """Training images -> feature store ``<output>.descriptors`` through src/extract.py; returns the store and
    {image name: label}."""
    root, names, labels = training_images(cfg)
    image_list = out_stem.with_name(out_stem.name + ".images.txt")
    write_text_atomic("".join(f"{n}\n" for n in names), image_list)
    store = out_stem.with_name(out_stem.name + ".descriptors")
    overrides = [
        f"ckpt_path={ckpt}",
        f"images={image_list}",
        f"image_root={root}",
        f"output={store}",
        f"test_size={_test_size(cfg)}",
        "dtype=float32",
        f"batch_size={cfg.batch_size}",
        f"num_workers={cfg.num_workers}",
        f"trainer.accelerator={cfg.accelerator}",
    ]
    ex_cfg = hydra.compose(config_name="extract", overrides=overrides)  # conf/extract.yaml, same search path
    with open_dict(ex_cfg):
        ex_cfg.paths.output_dir = str(out_stem.parent)
    _extract_entry().extract(ex_cfg)
    return store, dict(zip(names, labels.tolist()))


def whiten(cfg: DictConfig) -> Path:
    """Learn the whitening described by ``cfg`` (conf/whiten.yaml); returns the .npz path."""
    if cfg.method not in METHODS:
        raise ValueError(f"method={cfg.method!r}; choose one of {list(METHODS)}")
    npz, js = whitening_paths(cfg.output)
    check_writable_file(npz, "output")
    check_writable_file(js, "output")
    ckpt = Path(os.path.expanduser(str(cfg.ckpt_path)))
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt} does not exist")
    ckpt_sha = file_sha256(ckpt)
    stem = npz.with_suffix("")

    labels_of: dict[str, int] | None = None
    if cfg.features:
        if cfg.method == "lw":
            raise ValueError("method=lw learns from the training classes of `data`; leave features=null")
        store_path = Path(os.path.expanduser(str(cfg.features)))
    else:
        store_path, labels_of = extract_training_descriptors(cfg, ckpt, stem)
    store = load_features(store_path)
    fingerprint = store.meta.get("fingerprint") or {}
    if fingerprint.get("checkpoint_sha256") != ckpt_sha:
        raise ValueError(
            f"feature store {store_path} holds descriptors of checkpoint sha256 "
            f"{str(fingerprint.get('checkpoint_sha256'))[:12]}..., not of ckpt_path={ckpt} ({ckpt_sha[:12]}...)"
        )
    x = np.asarray(store.features, dtype=np.float64)
    options: dict[str, Any] = {"dim": cfg.dim, "shrinkage": float(cfg.shrinkage)}
    learned_on: dict[str, Any] = {"feature_store": str(store_path), "images": len(store)}
    if cfg.method == "pca":
        options["power"] = float(cfg.power)
        mean, proj, info = learn_pca(x, cfg.dim, float(cfg.shrinkage), float(cfg.power))
    else:
        labels = np.asarray([labels_of[n] for n in store.names])  # skipped images are not in the store
        options.update(max_pairs_per_class=cfg.max_pairs_per_class, seed=int(cfg.seed))
        pairs = class_pairs(labels, cfg.max_pairs_per_class, int(cfg.seed))
        mean, proj, info = learn_lw(x, pairs, cfg.dim, float(cfg.shrinkage))
        learned_on.update(classes=int(len(np.unique(labels))), data=cfg.data.get("root"))
    learned_on.update(info)
    meta = {
        "method": cfg.method,
        "options": options,
        "checkpoint": str(ckpt),
        "checkpoint_sha256": ckpt_sha,
        "descriptor_fingerprint": fingerprint,
        "learned_on": learned_on,
    }
    whitening = whitening_from_arrays(mean, proj, meta)
    out = save_whitening(stem, whitening)
    print(
        f"whitening ({cfg.method}, {proj.shape[1]} -> {proj.shape[0]}-d, learnt on {len(store):,} descriptors"
        + (f", {info['pairs']:,} matching pairs" if "pairs" in info else "")
        + f"): {out} (+ {js.name})"
    )
    for target in cfg.attach_to or []:
        print(
            f"recorded in feature store metadata: {attach_to_store(os.path.expanduser(str(target)), whitening)}"
        )
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="whiten")
def main(cfg: DictConfig) -> None:
    whiten(cfg)


if __name__ == "__main__":
    main()
