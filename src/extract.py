"""Extract descriptors of a folder or a list of images into a feature store (dalg.retrieval.features).

    python src/extract.py ckpt_path=<ckpt> images=/data/revisitop1m/jpg output=/feats/r1m dtype=float16
    python src/extract.py ckpt_path=<ckpt> images=/data/list.txt image_root=/data output=/feats/mine

Writes ``<output>.npy`` (N x D, fp16/fp32), ``<output>.names.txt`` and ``<output>.json`` atomically. Finished
work is kept in ``<output>.partial/`` shards: rerunning the same command after an interruption resumes
where it stopped. Descriptors come from the model's own ``validation_step`` (as in training and src/eval.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import dalg.utils.config  # noqa: F401  (registers ${repo_root:})
from dalg.data.images import ImageReadError, image_size, load_rgb
from dalg.data.sampling import SizeBucketBatchSampler
from dalg.data.transforms import eval_transform, resized_shape
from dalg.lit.module import RetrievalModule
from dalg.retrieval.features import FeatureWriter, load_features, store_paths

log = logging.getLogger(__name__)


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


class ImageFiles(Dataset):
    """``(image tensor, index)`` for images ``root/name``; the same item shape as the evaluation sets."""

    def __init__(self, root: Path, names: Sequence[str], test_size: int):
        self.root = root
        self.names = list(names)
        self.transform = eval_transform(test_size)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_rgb(self.root / self.names[index])), index


class StoreWriterCallback(pl.Callback):
    """Streams each batch's descriptors into the resumable writer; a progress bar shows images/s."""

    def __init__(self, writer: FeatureWriter, names: Sequence[str], total: int, already: int):
        self.writer = writer
        self.names = list(names)
        self.bar = tqdm(
            total=total, initial=already, unit="img", desc="extract", dynamic_ncols=True, smoothing=0.1
        )

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ):
        index = outputs["index"].detach().cpu().tolist()
        self.writer.add(outputs["descriptors"].detach().float().cpu().numpy(), [self.names[i] for i in index])
        self.bar.update(len(index))

    def close(self) -> None:
        self.bar.close()


def _descriptor_dim(module: RetrievalModule, test_size: int) -> int:
    dim = (module.hparams.get("model_cfg") or {}).get("embed_dim")
    if dim:
        return int(dim)
    with torch.no_grad():  # not in the config: ask the model
        return int(module.net.extract(torch.zeros(1, 3, test_size, test_size), [1.0]).shape[1])


def extract(cfg: DictConfig) -> Path:
    """Run the extraction described by ``cfg`` (conf/extract.yaml); returns the store's .npy path."""
    names, root = list_images(cfg.images, cfg.get("image_root"), cfg.extensions)
    arr_path, _, json_path = store_paths(cfg.output)
    if json_path.exists() and not cfg.overwrite:
        store = load_features(arr_path)
        if store.names == names:
            print(
                f"feature store {arr_path} is already complete ({len(store):,} images); overwrite=true to redo"
            )
            return arr_path
        raise FileExistsError(
            f"{arr_path} exists with other images; choose another output or set overwrite=true"
        )

    ckpt = Path(os.path.expanduser(str(cfg.ckpt_path)))
    module = RetrievalModule.for_evaluation(ckpt, cfg.get("scales"), cfg.get("inference"))
    scales = list(module.eval_scales or getattr(module.net, "scales", None) or [1.0])
    dim = _descriptor_dim(module, int(cfg.test_size))

    meta = {
        "checkpoint": str(ckpt),
        "test_size": int(cfg.test_size),
        "scales": scales,
        "inference": module.inference_label,
        "source": str(cfg.images),
    }
    writer = FeatureWriter(arr_path, dim=dim, dtype=cfg.dtype, shard_size=int(cfg.shard_size), meta=meta)
    todo = [n for n in names if not writer.is_done(n)]
    if writer.n_done:
        print(f"resuming {writer.partial}: {writer.n_done:,} of {len(names):,} images already extracted")

    unreadable: list[str] = []
    sizes, keep = [], []
    for n in todo:  # header reads only: batches group images of equal resized shape (no padding, no crop)
        try:
            w, h = image_size(root / n)
        except ImageReadError as e:
            if not cfg.skip_unreadable:
                raise
            unreadable.append(f"{n}\t{e.reason}")
            continue
        sizes.append(resized_shape(w, h, int(cfg.test_size)))
        keep.append(n)
    if unreadable:
        log.warning(
            "%d unreadable images skipped (listed in %s)",
            len(unreadable),
            arr_path.with_suffix(".skipped.txt"),
        )
        arr_path.with_suffix(".skipped.txt").write_text("\n".join(unreadable) + "\n", encoding="utf-8")

    if keep:
        dataset = ImageFiles(root, keep, int(cfg.test_size))
        loader = DataLoader(
            dataset,
            batch_sampler=SizeBucketBatchSampler(sizes, int(cfg.batch_size)),
            num_workers=int(cfg.num_workers),
        )
        sink = StoreWriterCallback(writer, keep, total=len(names) - len(unreadable), already=writer.n_done)
        trainer = pl.Trainer(
            accelerator=cfg.accelerator,
            devices=1,
            precision=cfg.precision,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[sink],
        )
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
    skipped = {u.split("\t", 1)[0] for u in unreadable}
    out = writer.finalize(order=[n for n in names if n not in skipped])
    print(f"feature store: {out} (+ .names.txt, .json): {len(names) - len(skipped):,} x {dim} {cfg.dtype}")
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="extract")
def main(cfg: DictConfig) -> None:
    extract(cfg)


if __name__ == "__main__":
    main()
