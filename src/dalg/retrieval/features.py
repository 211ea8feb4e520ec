"""Feature store: descriptors of named images on disk, written atomically and resumable.

Format (version 1). A store called ``<stem>`` (given as ``<stem>`` or ``<stem>.npy``) is three files:

* ``<stem>.npy``        -- ``(N, D)`` float16 or float32 array in NumPy's ``.npy`` format, one L2-normalised
                           descriptor per row; open it with ``np.load(path, mmap_mode="r")`` to stream it.
* ``<stem>.names.txt``  -- N lines (UTF-8): the image name of each row, in row order.
* ``<stem>.json``       -- ``{"format": "dalg-features", "version": 1, "count": N, "dim": D,
                           "dtype": "float16", "meta": {...}}``; written last, it marks the store complete.

Every file is written to a temporary file in the same folder and moved into place with ``os.replace``.

Resuming: :class:`FeatureWriter` keeps finished work in ``<stem>.partial/`` as shards
(``shard_000000.npy`` + ``shard_000000.names.txt``, each written atomically; a shard counts once both files
are there with matching lengths). A new writer on the same path picks the shards up (``done`` = the names
already extracted); :meth:`FeatureWriter.finalize` streams the shards into the final store and removes the
partial folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dalg.utils.atomic import atomic_replace

FORMAT = "dalg-features"
VERSION = 1
DTYPES = ("float16", "float32")


def store_paths(path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """(array, names, json) paths of the store ``path`` (with or without the ``.npy`` suffix)."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix == ".npy" else p
    return (
        stem.with_name(stem.name + ".npy"),
        stem.with_name(stem.name + ".names.txt"),
        stem.with_name(stem.name + ".json"),
    )


def _write_names(names: Sequence[str], final: Path) -> None:
    for n in names:
        if "\n" in n or "\r" in n:
            raise ValueError(
                f"image name {n!r} contains a line break; the names file holds one name per line"
            )
    atomic_replace(lambda f: f.write("".join(f"{n}\n" for n in names)), final, mode="w")


def _read_names(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def _check_dtype(dtype: str) -> np.dtype:
    if str(dtype) not in DTYPES:
        raise ValueError(f"feature dtype must be one of {DTYPES}, got {dtype!r}")
    return np.dtype(str(dtype))


def save_features(
    path: str | os.PathLike,
    features: np.ndarray,
    names: Sequence[str],
    dtype: str = "float16",
    meta: dict | None = None,
) -> Path:
    """Write a complete store atomically (array, then names, then the json marker). Returns the .npy path."""
    dt = _check_dtype(dtype)
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {features.shape}")
    if len(names) != features.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows but {len(names)} names")
    arr_p, names_p, json_p = store_paths(path)
    if json_p.exists():  # an old store is no longer complete while being replaced
        json_p.unlink()
    atomic_replace(lambda f: np.save(f, features.astype(dt, copy=False)), arr_p)
    _write_names(list(names), names_p)
    _write_json(json_p, features.shape[0], features.shape[1], dt, meta)
    return arr_p


def _write_json(json_p: Path, count: int, dim: int, dt: np.dtype, meta: dict | None) -> None:
    info = {"format": FORMAT, "version": VERSION, "count": int(count), "dim": int(dim), "dtype": dt.name}
    info["meta"] = meta or {}
    atomic_replace(lambda f: f.write(json.dumps(info, indent=2) + "\n"), json_p, mode="w")


@dataclass
class FeatureStore:
    features: np.ndarray  # (N, D), a read-only np.memmap when loaded with mmap=True
    names: list[str]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)


def load_features(path: str | os.PathLike, mmap: bool = True) -> FeatureStore:
    """Open a complete store; raises with the file name when it is missing, partial or inconsistent."""
    arr_p, names_p, json_p = store_paths(path)
    if not json_p.exists():
        partial = arr_p.with_suffix(".partial")
        hint = f" (an unfinished extraction is in {partial}; rerun it to resume)" if partial.exists() else ""
        raise FileNotFoundError(f"feature store {arr_p} is missing or incomplete: no {json_p.name}{hint}")
    info = json.loads(json_p.read_text(encoding="utf-8"))
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise ValueError(
            f"{json_p} is not a {FORMAT} v{VERSION} store: {info.get('format')} v{info.get('version')}"
        )
    feats = np.load(arr_p, mmap_mode="r" if mmap else None)
    names = _read_names(names_p)
    if feats.ndim != 2 or feats.shape != (info["count"], info["dim"]) or len(names) != info["count"]:
        raise ValueError(
            f"feature store {arr_p} is inconsistent: array {feats.shape}, {len(names)} names, "
            f"json says {info['count']} x {info['dim']}"
        )
    return FeatureStore(features=feats, names=names, meta=info.get("meta", {}))


class FeatureWriter:
    """Accumulates descriptors in atomic shards under ``<stem>.partial/``; resumes from them when restarted."""

    def __init__(
        self,
        path: str | os.PathLike,
        dim: int,
        dtype: str = "float16",
        shard_size: int = 4096,
        meta: dict | None = None,
    ):
        self.dtype = _check_dtype(dtype)
        self.dim = int(dim)
        self.shard_size = int(shard_size)
        self.meta = meta or {}
        self.array_path, self.names_path, self.json_path = store_paths(path)
        self.partial = self.array_path.with_suffix(".partial")
        self.partial.mkdir(parents=True, exist_ok=True)
        info_p = self.partial / "info.json"
        info = {"dim": self.dim, "dtype": self.dtype.name}
        if info_p.exists():
            old = json.loads(info_p.read_text(encoding="utf-8"))
            if old != info:
                raise ValueError(
                    f"cannot resume {self.partial}: it holds {old['dim']}-d {old['dtype']} features, "
                    f"this run writes {self.dim}-d {self.dtype.name}; delete the folder to start over"
                )
        else:
            atomic_replace(lambda f: f.write(json.dumps(info)), info_p, mode="w")
        self._shards: list[Path] = []
        self.done: list[str] = []
        for arr in sorted(self.partial.glob("shard_*.npy")):
            names_p = arr.with_suffix(".names.txt")
            if not names_p.exists():  # interrupted between the two files: redo that shard
                arr.unlink()
                continue
            names = _read_names(names_p)
            rows = np.load(arr, mmap_mode="r").shape[0]
            if rows != len(names):
                raise ValueError(f"corrupt shard {arr}: {rows} rows but {len(names)} names")
            self._shards.append(arr)
            self.done.extend(names)
        self._done_set = set(self.done)
        self._buf: list[np.ndarray] = []
        self._buf_names: list[str] = []

    @property
    def n_done(self) -> int:
        return len(self.done) + len(self._buf_names)

    def is_done(self, name: str) -> bool:
        return name in self._done_set

    def add(self, features: np.ndarray, names: Iterable[str]) -> None:
        features = np.asarray(features)
        names = list(names)
        if features.ndim != 2 or features.shape[1] != self.dim or features.shape[0] != len(names):
            raise ValueError(f"expected ({len(names)}, {self.dim}) features, got {features.shape}")
        self._buf.append(features.astype(self.dtype))
        self._buf_names.extend(names)
        self._done_set.update(names)
        if len(self._buf_names) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._buf_names:
            return
        arr = self.partial / f"shard_{len(self._shards):06d}.npy"
        feats = np.concatenate(self._buf)
        atomic_replace(lambda f: np.save(f, feats), arr)
        _write_names(self._buf_names, arr.with_suffix(".names.txt"))  # written second: marks the shard done
        self._shards.append(arr)
        self.done.extend(self._buf_names)
        self._buf, self._buf_names = [], []

    def finalize(self, order: Sequence[str] | None = None) -> Path:
        """Stream the shards into the final store (rows in ``order`` if given) and delete the partial folder."""
        self.flush()
        names = list(self.done)
        dest = np.arange(len(names), dtype=np.int64)  # final row of each extracted row
        if order is not None:
            final_row = {nm: i for i, nm in enumerate(order)}
            missing = [nm for nm in order if nm not in self._done_set]
            if missing:
                raise ValueError(f"{len(missing)} requested names were never extracted, e.g. {missing[:3]}")
            dest = np.array([final_row.get(nm, -1) for nm in names], dtype=np.int64)
            names = list(order)
        n = len(names)
        if self.json_path.exists():
            self.json_path.unlink()
        self.array_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.array_path.name}.", suffix=".tmp", dir=self.array_path.parent
        )
        os.close(fd)
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype, shape=(n, self.dim))
            row = 0
            for arr in self._shards:  # one shard in memory at a time
                part = np.load(arr, mmap_mode="r")
                d = dest[row : row + part.shape[0]]
                keep = d >= 0  # rows not in `order` are dropped
                out[d[keep]] = part[keep]
                row += part.shape[0]
            out.flush()
            del out
            os.replace(tmp, self.array_path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        _write_names(names, self.names_path)
        _write_json(self.json_path, n, self.dim, self.dtype, self.meta)
        shutil.rmtree(self.partial)
        return self.array_path
