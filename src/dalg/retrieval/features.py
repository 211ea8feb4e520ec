"""Feature store: descriptors of named images on disk, written atomically and resumable.

Format (version 1). A store called ``<stem>`` (given as ``<stem>`` or ``<stem>.npy``) is three files:

* ``<stem>.npy``        -- ``(N, D)`` float16 or float32 array in NumPy's ``.npy`` format, one L2-normalised
                           descriptor per row; open it with ``np.load(path, mmap_mode="r")`` to stream it.
* ``<stem>.names.txt``  -- N lines (UTF-8): the image name of each row, in row order.
* ``<stem>.json``       -- ``{"format": "dalg-features", "version": 1, "count": N, "dim": D,
                           "dtype": "float16", "meta": {...}}``; written last, it marks the store complete.

Every file is written to a temporary file in the same folder and moved into place (``dalg.utils.atomic``).

Resuming: :class:`FeatureWriter` writes the rows of a known image list (row ``i`` = ``names[i]``) and keeps
finished work in ``<stem>.partial/`` as shards named by the rows they hold: ``rows_000000-004095.npy`` +
``rows_000000-004095.names.txt`` (first and last row; each file written atomically; a shard counts once both
files are there with matching lengths). A shard never reuses another's name, so a lost shard only loses its own
rows, which the next run extracts again. ``info.json`` records the descriptor *fingerprint* (everything that
determines a descriptor: checkpoint hash, preprocessing, inference options, image list, dim, dtype); a writer
with another fingerprint refuses to resume and names the differences. :meth:`FeatureWriter.finalize` re-reads the
shards from disk, checks that every row is there exactly once (or was skipped as unreadable), streams them into
the final store and removes the partial folder. Skipped rows are left out of the store (its rows and names
agree) and listed with their reasons in the json's ``meta["skipped"]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dalg.utils.atomic import atomic_path, atomic_replace
from dalg.utils.json_record import read_versioned_json

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
    info = read_versioned_json(json_p, "feature store", FORMAT, VERSION, "store")
    try:  # allow_pickle stays False: a store from elsewhere never unpickles objects
        feats = np.load(arr_p, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"feature store {arr_p} cannot be read as a NumPy array: {e}") from e
    if feats.dtype not in (np.float16, np.float32):
        raise ValueError(f"feature store {arr_p} holds {feats.dtype}, not float16/float32 descriptors")
    names = _read_names(names_p)
    if feats.ndim != 2 or feats.shape != (info["count"], info["dim"]) or len(names) != info["count"]:
        raise ValueError(
            f"feature store {arr_p} is inconsistent: array {feats.shape}, {len(names)} names, "
            f"json says {info['count']} x {info['dim']}"
        )
    return FeatureStore(features=feats, names=names, meta=info.get("meta", {}))


# rows of a distractor store whose norm is checked before use (evenly spaced), and the tolerance (float16 rows)
DISTRACTOR_NORM_SAMPLE = 4096
DISTRACTOR_NORM_TOL = 1e-2


def load_distractors(
    path: str | os.PathLike, dim: int, checkpoint_sha256: str | None = None, weights: str | None = None
) -> np.ndarray:
    """The descriptors of a distractor store (memory-mapped), checked before any extraction: they must have the
    model's size ``dim`` and be L2-normalised (inner product = cosine), checked on evenly spaced rows; when the
    store records how it was extracted (src/extract.py's fingerprint), also the same checkpoint
    (``checkpoint_sha256``) and the same weights of it (``weights``: raw or ema), since descriptors of another
    model rank as noise."""
    store = load_features(os.path.expanduser(str(path)))
    features = store.features
    recorded = store.meta.get("fingerprint") if isinstance(store.meta, dict) else None
    if isinstance(recorded, dict):
        theirs = recorded.get("checkpoint_sha256")
        if checkpoint_sha256 and theirs and theirs != checkpoint_sha256:
            raise ValueError(
                f"distractors={path}: extracted with checkpoint sha256 {str(theirs)[:12]}..., the queries and "
                f"database come from {checkpoint_sha256[:12]}...; extract them with this checkpoint (src/extract.py)"
            )
        if weights is not None and recorded.get("weights", "raw") != weights:
            raise ValueError(
                f"distractors={path}: extracted with the {recorded.get('weights', 'raw')} weights of the checkpoint, "
                f"the evaluation uses its {weights} weights; set weights= alike or extract them again"
            )
    if features.ndim != 2 or features.shape[1] != dim:
        got = f"{features.shape[1]}-d" if features.ndim == 2 else f"of shape {features.shape}"
        raise ValueError(
            f"distractors={path}: descriptors are {got}, the model gives {dim}-d; "
            f"extract them with this checkpoint (src/extract.py)"
        )
    rows = np.unique(
        np.linspace(0, len(features) - 1, min(len(features), DISTRACTOR_NORM_SAMPLE)).astype(np.int64)
    )
    norms = np.linalg.norm(np.asarray(features[rows], dtype=np.float32), axis=1)
    bad = ~(np.abs(norms - 1.0) <= DISTRACTOR_NORM_TOL)  # NaN counts as bad
    if bad.any():
        raise ValueError(
            f"distractors={path}: {int(bad.sum())} of {len(rows)} checked rows are not L2-normalised "
            f"(norms e.g. {[round(float(n), 4) for n in norms[bad][:3]]}, row {int(rows[bad][0])}); "
            f"the ranking needs unit vectors"
        )
    return features


SHARD_PREFIX = "rows_"


def shard_file(partial: Path, first: int, last: int) -> Path:
    """``<partial>/rows_<first>-<last>.npy``: the first and last image-list row the shard holds."""
    return partial / f"{SHARD_PREFIX}{first:06d}-{last:06d}.npy"


def _shard_range(arr: Path) -> tuple[int, int] | None:
    try:
        first, last = arr.name[len(SHARD_PREFIX) : -len(".npy")].split("-")
        return int(first), int(last)
    except ValueError:
        return None


def row_ranges(rows: Iterable[int], names: Sequence[str] | None = None, limit: int = 5) -> str:
    """``"12-15 (a.jpg .. d.jpg), 40 (x.jpg)"``: sorted rows as ranges, for error messages."""
    rows = sorted(set(int(r) for r in rows))
    spans: list[tuple[int, int]] = []
    for r in rows:
        if spans and r == spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], r)
        else:
            spans.append((r, r))

    def one(a: int, b: int) -> str:
        text = f"{a}" if a == b else f"{a}-{b}"
        if names is not None:
            text += f" ({names[a]})" if a == b else f" ({names[a]} .. {names[b]})"
        return text

    more = f", ... ({len(spans) - limit} more ranges)" if len(spans) > limit else ""
    return ", ".join(one(a, b) for a, b in spans[:limit]) + more


def _jsonable(obj: Any) -> Any:
    """What ``obj`` looks like after a JSON round trip (tuples become lists, keys strings), to compare records."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fingerprint_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``["test_size: 512 vs 224", ...]`` (old vs new) for every key, nested ones dotted, that differs."""
    a, b = _flat(_jsonable(old)), _flat(_jsonable(new))
    missing = "(not recorded)"
    return [
        f"{k}: {a.get(k, missing)!r} vs {b.get(k, missing)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing)
    ]


def store_fingerprint(
    settings: Mapping[str, Any], names: Sequence[str], dim: int, dtype: str
) -> dict[str, Any]:
    """The fingerprint a store records: ``settings`` (what determines a descriptor) + image list hash, dim, dtype."""
    list_sha = hashlib.sha256("".join(f"{n}\n" for n in names).encode("utf-8")).hexdigest()
    return _jsonable(
        {
            **settings,
            "image_list_sha256": list_sha,
            "images": len(names),
            "dim": int(dim),
            "dtype": str(dtype),
        }
    )


class FeatureWriter:
    """Writes descriptors of the images ``names`` (row ``i`` = ``names[i]``) in atomic shards under
    ``<stem>.partial/``; resumes from them when restarted with the same ``fingerprint``.

    ``fingerprint``: a JSON-able mapping of everything that determines a descriptor (the writer adds the image
    list, ``dim`` and ``dtype``). Rows of one shard lie in one block of ``shard_size`` rows of the list
    (``add`` flushes when a row of another block arrives), so shards are named by contiguous row ranges when the
    caller extracts block by block, as src/extract.py does.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        names: Sequence[str],
        dim: int,
        dtype: str = "float16",
        shard_size: int = 4096,
        meta: dict | None = None,
        fingerprint: Mapping[str, Any] | None = None,
    ):
        self.dtype = _check_dtype(dtype)
        self.dim = int(dim)
        self.shard_size = int(shard_size)
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.names = list(names)
        self._row_of = {n: i for i, n in enumerate(self.names)}
        if len(self._row_of) != len(self.names):
            raise ValueError(
                f"{len(self.names) - len(self._row_of)} duplicate image names in the list to extract"
            )
        self.meta = meta or {}
        self.fingerprint = store_fingerprint(fingerprint or {}, self.names, self.dim, self.dtype.name)
        self.array_path, self.names_path, self.json_path = store_paths(path)
        self.partial = self.array_path.with_suffix(".partial")
        self.partial.mkdir(parents=True, exist_ok=True)
        info_p = self.partial / "info.json"
        info = {"format": f"{FORMAT}-partial", "version": VERSION + 1, "fingerprint": self.fingerprint}
        if info_p.exists():
            old = json.loads(info_p.read_text(encoding="utf-8"))
            if "fingerprint" not in old:
                raise ValueError(
                    f"cannot resume {self.partial}: an older version of this writer started it and did not "
                    f"record what its descriptors were extracted with; delete the folder to start over"
                )
            diffs = fingerprint_differences(old["fingerprint"], self.fingerprint)
            if diffs:
                raise ValueError(
                    f"cannot resume {self.partial}: its descriptors were extracted with other settings "
                    f"(old vs new): {'; '.join(diffs)}. Rerun with the old settings, or delete the folder "
                    f"(or choose another output) to start over"
                )
        else:
            atomic_replace(lambda f: f.write(json.dumps(info, indent=2) + "\n"), info_p, mode="w")
        self._shards = self._scan(repair=True)
        self._done_rows = {r for rows in self._shards.values() for r in rows.tolist()}
        self._buf: list[np.ndarray] = []
        self._buf_rows: list[int] = []
        self.skipped: dict[str, str] = {}  # name -> reason, this run's unreadable images

    def _rows_of(self, names: Sequence[str], where: str) -> np.ndarray:
        try:
            return np.array([self._row_of[n] for n in names], dtype=np.int64)
        except KeyError as e:
            raise ValueError(
                f"{where}: image {e.args[0]!r} is not in the list this store is written for"
            ) from None

    def _scan(self, repair: bool) -> dict[Path, np.ndarray]:
        """The complete shards on disk -> their rows. ``repair``: remove half-written ones (one file of the two),
        so their rows count as not done; otherwise leave them (``finalize`` reports their rows as missing)."""
        shards: dict[Path, np.ndarray] = {}
        for arr in self.partial.glob(f"{SHARD_PREFIX}*.npy"):
            names_p = arr.with_suffix(".names.txt")
            if not names_p.exists():  # interrupted between the two files: redo that shard
                if repair:
                    arr.unlink()
                continue
            span = _shard_range(arr)
            rows = self._rows_of(_read_names(names_p), f"shard {names_p}")
            n = np.load(arr, mmap_mode="r").shape
            if (
                span is None
                or len(n) != 2
                or n[0] != len(rows)
                or n[1] != self.dim
                or not len(rows)
                or (int(rows.min()), int(rows.max())) != span
            ):
                raise ValueError(
                    f"corrupt shard {arr}: array {n}, {len(rows)} names of rows {row_ranges(rows)}; "
                    f"delete it to extract its rows again"
                )
            shards[arr] = rows
        if repair:  # names files whose array was lost: their rows are extracted again
            for names_p in self.partial.glob(f"{SHARD_PREFIX}*.names.txt"):
                if not names_p.with_name(names_p.name[: -len(".names.txt")] + ".npy").exists():
                    names_p.unlink()
        return shards

    @property
    def done(self) -> list[str]:
        """Names already extracted (on disk or buffered), in list order."""
        return [self.names[r] for r in sorted(self._done_rows)]

    @property
    def n_done(self) -> int:
        return len(self._done_rows)

    def is_done(self, name: str) -> bool:
        return self._row_of.get(name, -1) in self._done_rows

    def add(self, features: np.ndarray, names: Iterable[str]) -> None:
        features = np.asarray(features)
        names = list(names)
        if features.ndim != 2 or features.shape[1] != self.dim or features.shape[0] != len(names):
            raise ValueError(f"expected ({len(names)}, {self.dim}) features, got {features.shape}")
        rows = self._rows_of(names, "add")
        again = [r for r in rows.tolist() if r in self._done_rows]
        if again or len(set(rows.tolist())) != len(rows):
            raise ValueError(f"rows {row_ranges(again or rows, self.names)} were already extracted")
        block = rows // self.shard_size
        for b in dict.fromkeys(block.tolist()):  # in order of arrival
            if self._buf_rows and self._buf_rows[0] // self.shard_size != b:
                self.flush()  # a shard holds rows of one block only
            sel = block == b
            self._buf.append(features[sel].astype(self.dtype))
            self._buf_rows.extend(rows[sel].tolist())
            self._done_rows.update(rows[sel].tolist())
            if len(self._buf_rows) >= self.shard_size:
                self.flush()

    def skip(self, name: str, reason: str) -> None:
        """Record an unreadable image: it is left out of the final store and listed in its json."""
        self._rows_of([name], "skip")
        self.skipped[name] = reason

    def flush(self) -> None:
        if not self._buf_rows:
            return
        rows = np.array(self._buf_rows, dtype=np.int64)
        feats = np.concatenate(self._buf)
        order = np.argsort(rows, kind="stable")
        rows, feats = rows[order], feats[order]
        arr = shard_file(self.partial, int(rows[0]), int(rows[-1]))
        if (
            arr.exists() or arr.with_suffix(".names.txt").exists()
        ):  # only possible if another writer runs here
            raise FileExistsError(
                f"shard {arr} already exists: is another extraction writing {self.partial}?"
            )
        atomic_replace(lambda f: np.save(f, feats), arr)
        # written second: marks the shard done
        _write_names([self.names[r] for r in rows.tolist()], arr.with_suffix(".names.txt"))
        self._shards[arr] = rows
        self._buf, self._buf_rows = [], []

    def finalize(self) -> Path:
        """Check that every row of the list is in exactly one shard on disk or was skipped, stream the shards into
        the final store (list order, skipped rows left out) and delete the partial folder."""
        self.flush()
        shards = self._scan(repair=False)  # what is really on disk now, not what this writer remembers
        count = np.zeros(len(self.names), dtype=np.int64)
        for rows in shards.values():
            np.add.at(count, rows, 1)
        skipped = np.zeros(len(self.names), dtype=bool)
        skipped[self._rows_of(list(self.skipped), "skipped")] = True
        missing = np.flatnonzero((count == 0) & ~skipped)
        repeated = np.flatnonzero(count > 1)
        if len(missing) or len(repeated):
            problems = []
            if len(missing):
                problems.append(
                    f"{len(missing)} rows are in no shard: {row_ranges(missing, self.names)} "
                    f"(rerun the extraction to extract them again)"
                )
            if len(repeated):
                files = sorted(p.name for p, rows in shards.items() if np.isin(rows, repeated).any())
                problems.append(
                    f"{len(repeated)} rows are in more than one shard: "
                    f"{row_ranges(repeated, self.names)} (files {files[:6]})"
                )
            raise ValueError(f"cannot assemble {self.array_path} from {self.partial}: " + "; ".join(problems))
        final_row = np.full(len(self.names), -1, dtype=np.int64)
        keep = np.flatnonzero(~skipped)
        final_row[keep] = np.arange(len(keep))
        n = len(keep)
        if self.json_path.exists():
            self.json_path.unlink()
        with atomic_path(self.array_path) as tmp:  # streamed into a memory map, then moved into place
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype, shape=(n, self.dim))
            for arr, rows in sorted(shards.items(), key=lambda item: int(item[1][0])):
                part = np.load(arr, mmap_mode="r")  # one shard in memory at a time
                dest = final_row[rows]
                kept = dest >= 0  # a row extracted before it became unreadable stays out
                out[dest[kept]] = part[kept]
            out.flush()
            del out
        _write_names([self.names[r] for r in keep.tolist()], self.names_path)
        skipped_list = [
            {"name": k, "reason": v}
            for k, v in sorted(self.skipped.items(), key=lambda kv: self._row_of[kv[0]])
        ]
        meta = {**self.meta, "fingerprint": self.fingerprint, "skipped": skipped_list}
        _write_json(self.json_path, n, self.dim, self.dtype, meta)
        shutil.rmtree(self.partial)
        return self.array_path
