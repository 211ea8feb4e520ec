"""Search a feature store (src/extract.py's output) with your own photos.

    python src/search.py index=/feats/mine query=photo.jpg top_k=10
    python src/search.py index=/feats/mine.npy query=/photos/queries/ [ckpt_path=<ckpt>] \
        [database_root=/photos] [report_html=false]

The query descriptors are extracted exactly as the store's were: the store records the checkpoint (path and
sha256) and every setting that determines a descriptor (its fingerprint: test size, scales, resize rule,
inference options, input normalisation); search.py rebuilds the extraction from that record and refuses a
checkpoint of other content or a preprocessing that comes out different. The store is ranked memory-mapped, in
chunks (dalg.retrieval.index.search: exact inner product, ties by the lower row), so a 1M-row fp16 store needs
no more memory than its chunk. Prints each query's ranked results with their similarity and writes, into
``output_dir``: ``results.json``, ``results.png`` (a result grid) and ``report/index.html`` (the static
results browser, with the model's attention maps over each query).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

sys.path.insert(
    0, str(Path(__file__).resolve().parent)
)  # extract.py: the store's image reading + fingerprint

import dalg.utils.config  # noqa: E402,F401  (registers ${repo_root:})
from dalg.data.image_list import ImageList, resized_sizes  # noqa: E402
from dalg.data.images import ImageReadError  # noqa: E402
from dalg.data.sampling import SizeBucketBatchSampler  # noqa: E402
from dalg.data.transforms import eval_transform, parse_test_size  # noqa: E402
from dalg.lit.module import RetrievalModule  # noqa: E402
from dalg.report.attention import model_attention  # noqa: E402
from dalg.report.browser import write_report  # noqa: E402
from dalg.report.content import from_search  # noqa: E402
from dalg.report.grid import search_grid  # noqa: E402
from dalg.retrieval.features import FeatureStore, fingerprint_differences, load_features  # noqa: E402
from dalg.retrieval.index import search  # noqa: E402
from dalg.retrieval.whitening import (  # noqa: E402
    Whitening,
    load_whitening,
    whiten_descriptors,
    whitening_of_store,
)
from dalg.utils.atomic import atomic_replace, write_json_atomic  # noqa: E402
from dalg.utils.run_metadata import file_sha256  # noqa: E402
from extract import descriptor_fingerprint, list_images  # noqa: E402

# what the writer adds to the fingerprint about the stored image list (not about how a descriptor is made)
STORE_ONLY_KEYS = ("image_list_sha256", "images", "dim", "dtype")


class _Paths(Sequence):
    """``root / names[i]`` on demand: a 1M-row store's names stay one list, paths are made when shown."""

    def __init__(self, root: Path, names: Sequence[str]):
        self.root, self.names = root, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):
        return str(self.root / self.names[i])


def query_images(
    query: str, extensions: Sequence[str], query_root: str | None = None
) -> tuple[list[str], Path]:
    """(names, root) of the query images: one image file, a folder (recursive) or a list file (its paths
    relative to ``query_root``, default the list's folder)."""
    src = Path(os.path.expanduser(str(query)))
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    if src.is_file() and src.suffix.lower() in exts:
        return [src.name], src.parent
    if not src.exists():
        raise FileNotFoundError(f"query={src}: no such image, folder or list file")
    try:
        return list_images(src, query_root, extensions)
    except UnicodeDecodeError as e:  # a file that is neither an image of these extensions nor a text list
        raise ValueError(f"query={src}: not an image with extension in {sorted(exts)} nor a list file") from e
    except ValueError as e:
        raise ValueError(f"query={src}: {e}") from e


def open_index(index: str) -> FeatureStore:
    """The store, memory-mapped; it must record how its descriptors were extracted."""
    store = load_features(os.path.expanduser(str(index)))  # errors name the store's files
    if "fingerprint" not in store.meta or "checkpoint_sha256" not in store.meta["fingerprint"]:
        raise ValueError(
            f"index={index}: the store does not record the checkpoint and settings its descriptors were "
            f"extracted with (an older version of extract.py wrote it); extract it again to search it"
        )
    return store


def checkpoint_for(store: FeatureStore, index: str, ckpt_path: str | None) -> Path:
    """The store's checkpoint (or ``ckpt_path``), refused unless its sha256 is the one the store records."""
    recorded = store.meta.get("checkpoint")
    ckpt = Path(os.path.expanduser(str(ckpt_path or recorded or "")))
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"checkpoint {ckpt} not found ({'ckpt_path' if ckpt_path else f'recorded by index={index}'}); "
            f"pass ckpt_path=<the checkpoint the store was extracted with>"
        )
    want = store.meta["fingerprint"]["checkpoint_sha256"]
    got = file_sha256(ckpt)
    if got != want:
        raise ValueError(
            f"checkpoint {ckpt} (sha256 {got[:16]}...) is not the one index={index} was extracted with "
            f"(sha256 {want[:16]}..., recorded path {recorded}): its descriptors would not be comparable. "
            f"Use that checkpoint, or extract the store again with this one (src/extract.py)"
        )
    return ckpt


class _Collector(pl.Callback):
    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.parts.append(
            (outputs["index"].detach().cpu().numpy(), outputs["descriptors"].detach().float().cpu().numpy())
        )


def extract_queries(
    store: FeatureStore, index: str, ckpt: Path, names: list[str], root: Path, cfg: DictConfig
) -> tuple[np.ndarray, RetrievalModule]:
    """Query descriptors (float32, one row per name) made exactly as the store's: its recorded settings, and a
    refusal when this code derives a different extraction from them (fingerprint differences named)."""
    recorded = store.meta["fingerprint"]
    settings = dict(recorded.get("config") or {})
    module = RetrievalModule.for_evaluation(
        ckpt,
        settings.get("scales"),
        settings.get("inference"),
        settings.get("scale_resize"),
        recorded.get("weights", "raw"),  # the weights the store was extracted with (absent: the raw ones)
    )
    test_size = parse_test_size(settings.get("test_size"), f"index={index}: test_size")
    transform = eval_transform(test_size, module.input_config)  # as extract.py builds it
    dataset = ImageList([root / n for n in names], transform)
    dataset.max_pixels = settings.get("max_pixels")
    dataset.decode_side = test_size
    # hashes the checkpoint again (checkpoint_for did, for its plain refusal): extract.py's one definition
    now = descriptor_fingerprint(OmegaConf.create(settings), ckpt, module, transform)
    diffs = fingerprint_differences({k: v for k, v in recorded.items() if k not in STORE_ONLY_KEYS}, now)
    if diffs:
        raise ValueError(
            f"index={index}: the queries would not be extracted as the store was (store vs now): "
            f"{'; '.join(diffs)}. Extract the store again with this version (src/extract.py)"
        )
    # header reads: a missing or broken query is named before any extraction
    sizes, errors = resized_sizes(dataset, range(len(names)), test_size, module.input_config.size_multiple)
    if errors:
        e = next(iter(errors.values()))
        raise ImageReadError(e.path, f"query image: {e.reason} ({len(errors)} unreadable queries)", e.kind)
    loader = DataLoader(
        dataset,
        batch_sampler=SizeBucketBatchSampler(
            [sizes[i] for i in range(len(names))], int(cfg.batch_size)
        ).batches,
        num_workers=int(cfg.num_workers),
    )
    collector = _Collector()
    # the store's precision: it determines the descriptors (part of the fingerprint)
    trainer = hydra.utils.instantiate(
        cfg.trainer, precision=settings.get("precision", "32-true"), callbacks=[collector]
    )
    trainer.validate(module, dataloaders=loader, verbose=False)
    out = np.zeros((len(names), store.features.shape[1]), dtype=np.float32)
    seen = np.zeros(len(names), dtype=bool)
    for idx, desc in collector.parts:
        if desc.shape[1] != out.shape[1]:
            raise ValueError(
                f"the model gives {desc.shape[1]}-d descriptors, index={index} holds {out.shape[1]}-d"
            )
        out[idx], seen[idx] = desc, True
    if not seen.all():
        raise RuntimeError(f"no descriptor was extracted for {[names[i] for i in np.flatnonzero(~seen)][:5]}")
    return out, module


def whitening_for(choice: Any, store: FeatureStore, index: str) -> Whitening | None:
    """``whitening=``: null = the one recorded in the store's metadata (src/whiten.py attach_to=), if any;
    false = none; a path = that whitening."""
    if choice is False:
        return None
    if choice:
        return load_whitening(os.path.expanduser(str(choice)))
    return whitening_of_store(store.meta, f"index={index}")


def search_store(
    queries: np.ndarray,
    features: np.ndarray,
    k: int,
    chunk_size: int,
    use_gpu: bool | None = None,
    whitening: Whitening | None = None,
    checkpoint_sha256: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of the top-``k`` store rows per query. With a whitening, queries and store rows are
    whitened alike (dalg.retrieval.whitening), the store ``chunk_size`` rows at a time (a whitened float32
    copy of a 1M x 512 store is 2 GiB; chunked, the whole search peaked at 2.4 GiB); the chunks' top-k lists
    merge with ties by the lower row, as dalg.retrieval.index.search ranks."""
    if whitening is None:
        return search(queries, features, k, chunk_size=chunk_size, use_gpu=use_gpu)
    q = whiten_descriptors(queries, whitening, "the queries", checkpoint_sha256)
    whitening.check_applies(features.shape[1], checkpoint_sha256, "the store's descriptors")
    best_s = np.zeros((len(q), 0), dtype=np.float32)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    for start in range(0, features.shape[0], chunk_size):
        part = whitening.apply(features[start : start + chunk_size])
        s, i = search(q, part, min(k, len(part)), chunk_size=chunk_size, use_gpu=use_gpu)
        cat_s, cat_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i + start], 1)
        order = np.lexsort((cat_i, -cat_s), axis=-1)[:, :k]
        best_s, best_i = np.take_along_axis(cat_s, order, 1), np.take_along_axis(cat_i, order, 1)
    return best_s, best_i


def database_root(store: FeatureStore, cfg: DictConfig) -> Path:
    """Where the store's image names are relative to: ``database_root``, else the folder it was extracted from
    (a list file's folder when it was extracted from a list)."""
    if cfg.get("database_root"):
        return Path(os.path.expanduser(str(cfg.database_root)))
    source = Path(os.path.expanduser(str(store.meta.get("source", ""))))
    return source if source.is_dir() else source.parent


def peak_rss_gib() -> float:
    """This process's peak resident set size so far (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_search(cfg: DictConfig) -> dict[str, Any]:
    """Run the search described by ``cfg`` (conf/search.yaml); returns what is written to results.json."""
    t0 = time.perf_counter()
    top_k = int(cfg.top_k)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {cfg.top_k}")
    names, root = query_images(
        cfg.query, cfg.extensions, cfg.get("query_root")
    )  # bad paths are named before anything is loaded
    store = open_index(cfg.index)
    ckpt = checkpoint_for(store, cfg.index, cfg.get("ckpt_path"))
    whitening = whitening_for(cfg.get("whitening"), store, cfg.index)
    sha = store.meta["fingerprint"]["checkpoint_sha256"]
    if whitening is not None:  # refused before any extraction when learnt for other descriptors
        whitening.check_applies(store.features.shape[1], sha, f"the descriptors of index={cfg.index}")
    out_dir = Path(os.path.expanduser(str(cfg.output_dir)))
    out_dir.mkdir(parents=True, exist_ok=True)

    queries, module = extract_queries(store, cfg.index, ckpt, names, root, cfg)
    t_extract = time.perf_counter()
    k = min(top_k, len(store))
    scores, ranks = search_store(
        queries, store.features, k, int(cfg.chunk_size), cfg.get("use_gpu"), whitening, sha
    )
    t_search = time.perf_counter()

    db_paths = _Paths(database_root(store, cfg), store.names)
    query_paths = [str(root / n) for n in names]
    results = {
        "index": str(cfg.index),
        "images": len(store),
        "checkpoint": str(ckpt),
        "top_k": k,
        "database_root": str(db_paths.root),
        "whitening": whitening.describe() if whitening is not None else None,
        "queries": [
            {
                "query": query_paths[q],
                "results": [
                    {"rank": j + 1, "name": store.names[int(i)], "row": int(i), "score": float(s)}
                    for j, (i, s) in enumerate(zip(ranks[q], scores[q]))
                ],
            }
            for q in range(len(names))
        ],
    }
    for entry in results["queries"]:
        print(f"query {entry['query']}")
        for r in entry["results"]:
            print(f"  {r['rank']:>4}  {r['score']:.4f}  {r['name']}")

    write_json_atomic(results, out_dir / "results.json")
    grid = search_grid(
        query_paths, ranks[:, : int(cfg.grid_top_k)], scores, db_paths, thumb=int(cfg.grid_thumb)
    )
    atomic_replace(lambda f: grid.save(f, format="PNG"), out_dir / "results.png")
    written = [out_dir / "results.json", out_dir / "results.png"]
    if cfg.report_html:
        rs = from_search(
            Path(str(cfg.index)).name,
            query_paths,
            ranks,
            scores,
            db_paths,
            store.names,
            protocol={key: results[key] for key in ("index", "images", "checkpoint", "top_k", "whitening")},
        )
        size = cfg.report.get("attention_size")
        attention = model_attention(module.net, int(size)) if size else None
        written.append(
            write_report(
                out_dir / "report",
                [rs],
                title=f"search: {Path(str(cfg.index)).name}",
                attention=attention,
                thumb_size=int(cfg.report.thumb_size),
            )
        )
    t_end = time.perf_counter()
    print(
        f"{len(names)} queries x {len(store):,} images ({store.features.dtype}): extraction "
        f"{t_extract - t0:.1f} s, search {t_search - t_extract:.1f} s, outputs {t_end - t_search:.1f} s; "
        f"peak RSS {peak_rss_gib():.2f} GiB"
    )
    print("wrote " + ", ".join(str(p) for p in written))
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="search")
def main(cfg: DictConfig) -> None:
    torch.set_grad_enabled(False)
    run_search(cfg)


if __name__ == "__main__":
    main()
