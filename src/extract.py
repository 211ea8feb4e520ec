"""Extract descriptors of a folder or a list of images into a feature store (dalg.retrieval.features).

    python src/extract.py ckpt_path=<ckpt> images=/data/revisitop1m/jpg output=/feats/r1m dtype=float16
    python src/extract.py ckpt_path=<ckpt> images=/data/list.txt image_root=/data output=/feats/mine

Writes ``<output>.npy`` (N x D, fp16/fp32), ``<output>.names.txt`` and ``<output>.json`` atomically. Finished
work is kept in ``<output>.partial/`` shards named by image-list rows: rerunning the same command after an
interruption resumes where it stopped. The store records a fingerprint of everything that determines a
descriptor (:func:`descriptor_fingerprint`); a rerun with other settings refuses to mix them and names the
differences. ``<output>.lock`` keeps a second extraction off the same output while one runs. Unreadable images
(at the header or while decoding) are skipped with ``skip_unreadable`` and listed. Descriptors come from the
model's own ``validation_step`` (as in training and src/eval.py).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import dalg.utils.config  # noqa: F401  (registers ${repo_root:})
from dalg.data.image_list import ImageList, resized_sizes
from dalg.data.images import ImageReadError, load_rgb
from dalg.data.sampling import SizeBucketBatchSampler
from dalg.data.transforms import describe_test_size, eval_transform, parse_test_size
from dalg.eval_pipeline import extraction_record, test_scales
from dalg.lit.module import RetrievalModule
from dalg.retrieval.features import (
    FeatureWriter,
    fingerprint_differences,
    load_features,
    store_fingerprint,
    store_paths,
)
from dalg.utils.atomic import write_text_atomic
from dalg.utils.lock import exclusive_lock
from dalg.utils.run_metadata import file_sha256

log = logging.getLogger(__name__)

# conf/extract.yaml keys that do not change a descriptor: where images come from and go, and how fast they are
# processed. Every other key is part of the fingerprint (the image list and the checkpoint enter as hashes).
RUN_ONLY_KEYS = (
    "task_name",
    "run_name",
    "ckpt_path",
    "images",
    "image_root",
    "extensions",
    "output",
    "overwrite",
    "batch_size",
    "num_workers",
    "trainer",
    "eval_set_defaults",  # its test_size enters as test_size
    "shard_size",
    "skip_unreadable",
    "paths",
    "hydra",
    "weights",  # enters resolved (raw or ema), only when not raw: see descriptor_fingerprint
)


def list_images(
    images: str | os.PathLike, image_root: str | None, extensions: Sequence[str]
) -> tuple[list[str], Path]:
    """(names, root): image names relative to ``root``; a folder is searched recursively, sorted by name."""
    src = Path(os.path.expanduser(str(images)))
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    if src.is_dir():
        root = src
        names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in exts)
    elif src.is_file():
        root = Path(os.path.expanduser(image_root)) if image_root else src.parent
        with open(src, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    else:
        raise FileNotFoundError(f"images={src}: neither a folder nor a list file")
    if not names:
        raise ValueError(f"no images found in {src} (extensions {sorted(exts)})")
    if len(set(names)) != len(names):
        raise ValueError(f"{src}: {len(names) - len(set(names))} duplicate image names")
    return names, root


class ImageFiles(ImageList):
    """The images to extract, as the evaluation sets' items (:class:`dalg.data.image_list.ImageList`).

    With ``skip_unreadable``, an image that fails while decoding (a truncated JPEG whose header read fine) gives a
    zero image of its batch's shape (``sizes[index]``, what the size buckets were formed from) and the index as
    ``-1 - index``: the batch still collates, and the writer records the image as skipped instead of storing a
    descriptor for it.
    """

    def __init__(self, paths: Sequence[Path], transform, skip_unreadable: bool = False):
        super().__init__(paths, transform)
        self.sizes: dict[int, tuple[int, int]] = {}  # filled by the header scan, before any batch is made
        self.skip_unreadable = skip_unreadable

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            return super().__getitem__(index)
        except (ImageReadError, OSError):
            if not self.skip_unreadable or index not in self.sizes:
                raise
            return torch.zeros(3, *self.sizes[index]), -1 - index


class StoreWriterCallback(pl.Callback):
    """Streams each batch's descriptors into the resumable writer; a progress bar shows images/s. Indices
    ``-1 - i`` (images that failed to decode, see :class:`ImageFiles`) are collected in ``failed``."""

    def __init__(self, writer: FeatureWriter, names: Sequence[str], total: int, already: int):
        self.writer = writer
        self.names = list(names)
        self.failed: list[str] = []
        self.bar = tqdm(
            total=total, initial=already, unit="img", desc="extract", dynamic_ncols=True, smoothing=0.1
        )

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ):
        index = outputs["index"].detach().cpu().numpy()
        ok = index >= 0
        desc = outputs["descriptors"].detach().float().cpu().numpy()
        self.writer.add(desc[ok], [self.names[i] for i in index[ok]])
        self.failed += [self.names[-1 - i] for i in index[~ok]]
        self.bar.update(len(index))

    def close(self) -> None:
        self.bar.close()


def descriptor_fingerprint(cfg: DictConfig, ckpt: Path, module: RetrievalModule, transform: object) -> dict:
    """Everything that determines a descriptor, for the store to record and a resume to compare: the checkpoint's
    content (sha256 of the whole file, read in chunks: a size+mtime shortcut would miss a checkpoint rewritten in
    place, and hashing costs about as much as loading it), the resolved test scales and inference options, the
    preprocessing (the eval transform: test size, resize rule, no crop, input normalisation), and every config
    key not in RUN_ONLY_KEYS. The writer adds the image list, descriptor dim and dtype."""
    settings = {
        k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        for k, v in cfg.items()
        if k not in RUN_ONLY_KEYS
    }
    return {
        "checkpoint_sha256": file_sha256(ckpt),
        "scales": test_scales(module),
        "inference": module.inference_label,
        "transform": re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform)),  # no object addresses
        "config": settings,
        # only when not the raw weights, which every store written before the choice existed holds
        **({"weights": module.weights_source} if module.weights_source != "raw" else {}),
    }


def _block_batches(
    rows: Sequence[int], sizes: dict[int, tuple[int, int]], batch_size: int, block: int
) -> list[list[int]]:
    """Batches of images of equal resized shape, formed block by block of ``block`` rows of the image list (the
    shard size), so that each shard of the store holds one range of rows (``rows_000000-004095``)."""
    batches: list[list[int]] = []
    for _, group in itertools.groupby(rows, key=lambda r: r // block):
        group = list(group)
        local = SizeBucketBatchSampler([sizes[r] for r in group], batch_size).batches
        batches += [[group[i] for i in b] for b in local]
    return batches


def _decode_failure(path: Path) -> str:
    """Why ``path`` failed to decode in a loader worker (read again here, where the reason is needed)."""
    try:
        load_rgb(path)
    except (ImageReadError, OSError) as e:
        return getattr(e, "reason", None) or f"{type(e).__name__}: {e}"
    return "failed to decode during extraction (reads now: an intermittent storage error?)"


def extract(cfg: DictConfig) -> Path:
    """Run the extraction described by ``cfg`` (conf/extract.yaml); returns the store's .npy path.

    The output is locked for the whole run (``<output>.lock``): a second extraction on it is refused, naming the
    pid of the one that runs."""
    arr_path = store_paths(cfg.output)[0]
    with exclusive_lock(arr_path.with_suffix(".lock"), f"feature store {arr_path}"):
        return _extract(cfg)


def _extract(cfg: DictConfig) -> Path:
    names, root = list_images(cfg.images, cfg.get("image_root"), cfg.extensions)
    arr_path, _, json_path = store_paths(cfg.output)
    ckpt = Path(os.path.expanduser(str(cfg.ckpt_path)))
    test_size = parse_test_size(cfg.get("test_size"), "test_size")  # None: each image's own size
    module = RetrievalModule.for_evaluation(
        ckpt, cfg.get("scales"), cfg.get("inference"), cfg.get("scale_resize"), cfg.get("weights", "auto")
    )
    dim = int(module.net.embed_dim)  # the descriptor length (as eval.py checks distractor stores)
    config = module.input_config  # the checkpoint's normalisation and size multiple
    transform = eval_transform(test_size, config)
    dataset = ImageFiles([root / n for n in names], transform, bool(cfg.skip_unreadable))
    dataset.max_pixels = cfg.get("max_pixels")
    dataset.decode_side = test_size  # large JPEGs decode at reduced size (None: each image's own size)
    fingerprint = descriptor_fingerprint(cfg, ckpt, module, dataset.transform)

    if json_path.exists() and not cfg.overwrite:
        store = load_features(arr_path)
        if "fingerprint" not in store.meta:
            raise FileExistsError(
                f"{arr_path} exists without a record of the settings it was extracted with (an older version "
                f"wrote it). Choose another output or set overwrite=true"
            )
        diffs = fingerprint_differences(
            store.meta["fingerprint"], store_fingerprint(fingerprint, names, dim, cfg.dtype)
        )
        if not diffs:
            print(
                f"feature store {arr_path} is already complete ({len(store):,} images); overwrite=true to redo"
            )
            return arr_path
        raise FileExistsError(
            f"{arr_path} exists with descriptors of other settings or images (old vs new): {'; '.join(diffs)}. "
            f"Choose another output or set overwrite=true"
        )

    meta = {
        "checkpoint": str(ckpt),
        "test_size": describe_test_size(test_size),
        **extraction_record(module),  # scales, inference, input, scale_resize
        "source": str(cfg.images),
    }
    writer = FeatureWriter(
        arr_path,
        names,
        dim=dim,
        dtype=cfg.dtype,
        shard_size=int(cfg.shard_size),
        meta=meta,
        fingerprint=fingerprint,
    )
    todo = [r for r, n in enumerate(names) if not writer.is_done(n)]
    if writer.n_done:
        print(f"resuming {writer.partial}: {writer.n_done:,} of {len(names):,} images already extracted")

    # header reads only: batches group images of equal resized shape (no padding, no crop)
    sizes, unreadable = resized_sizes(dataset, todo, test_size, config.size_multiple)
    if unreadable and not cfg.skip_unreadable:
        raise next(iter(unreadable.values()))
    for r, e in unreadable.items():
        writer.skip(names[r], e.reason)
    dataset.sizes = sizes
    keep = [r for r in todo if r in sizes]

    if keep:
        loader = DataLoader(
            dataset,
            batch_sampler=_block_batches(keep, sizes, int(cfg.batch_size), writer.shard_size),
            num_workers=int(cfg.num_workers),
        )
        sink = StoreWriterCallback(
            writer, names, total=len(names) - len(writer.skipped), already=writer.n_done
        )
        trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[sink])
        try:
            trainer.validate(module, dataloaders=loader, verbose=False)
        finally:
            sink.close()
            writer.flush()  # whatever was extracted survives an interruption
        if trainer.interrupted:
            print(
                f"interrupted: {writer.n_done:,} of {len(names):,} images kept in {writer.partial}; rerun to resume"
            )
            return arr_path
        for n in sink.failed:  # decoded in a worker and failed there: the reason is read again here
            writer.skip(n, _decode_failure(root / n))

    skipped_txt = arr_path.with_suffix(".skipped.txt")
    if writer.skipped:
        write_text_atomic("".join(f"{n}\t{why}\n" for n, why in writer.skipped.items()), skipped_txt)
    elif skipped_txt.exists():  # an earlier run's list; those images read fine this time
        skipped_txt.unlink()
    out = writer.finalize()
    print(
        f"feature store: {out} (+ .names.txt, .json): {len(names) - len(writer.skipped):,} x {dim} {cfg.dtype}"
    )
    if writer.skipped:
        examples = "; ".join(f"{n} ({why})" for n, why in list(writer.skipped.items())[:3])
        print(
            f"{len(writer.skipped):,} unreadable images skipped: left out of the store, listed in {skipped_txt} "
            f"and in the json's meta.skipped; e.g. {examples}"
        )
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="extract")
def main(cfg: DictConfig) -> None:
    extract(cfg)


if __name__ == "__main__":
    main()
