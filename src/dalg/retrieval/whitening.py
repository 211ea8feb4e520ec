"""Descriptor whitening: a linear post-processing ``x -> normalise(P (x - m))`` learnt once, applied to queries,
database and distractors alike before ranking (pure NumPy).

Two ways of learning ``(m, P)``:

- ``pca``: PCA-whitening on a descriptor set (Jégou & Chum, ECCV 2012): ``m`` the mean, ``P = diag(l)^-power U^T``
  from the eigen-decomposition ``C = U diag(l) U^T`` of the covariance, optionally shrunk towards a multiple of the
  identity (``(1 - shrinkage) C + shrinkage * mean(l) I``), which tames the small, noisy eigenvalues of a set with
  few images. ``power`` 0.5 is whitening proper, 0 a rotation onto the principal axes.
- ``lw``: learnt whitening from matching pairs (Radenović et al., TPAMI 2019, "Lw"): the whitening part is the
  inverse square root of the intra-class covariance ``C_S`` of matching-pair differences, the rotation the PCA of
  the covariance of all learning descriptors in that whitened space (the paper's inter-class covariance ``C_D``, as
  cnnimageretrieval-pytorch estimates it); ``m`` the mean of the pairs' first descriptors. Pairs come from the
  training classes (:func:`class_pairs`). ``C_S`` is shrunk as above when ``shrinkage`` > 0.

Either keeps the first ``dim`` output components (largest variance first), and components whose eigenvalue is
numerically zero (a set smaller than the dimension) are dropped, not amplified.

On disk a whitening is ``<stem>.npz`` (arrays ``mean`` (D,) and ``projection`` (d, D), float32; read with
``allow_pickle=False``) and ``<stem>.json`` (written last; method, options, the checkpoint's sha256 and the
fingerprint of the descriptors it was learnt on). :meth:`Whitening.check_applies` refuses descriptors of
another checkpoint or size.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dalg.utils.atomic import atomic_replace, write_json_atomic
from dalg.utils.json_record import read_versioned_json

FORMAT = "dalg-whitening"
VERSION = 1
METHODS = ("pca", "lw")
# eigenvalues below this fraction of the largest are treated as zero (dropped, never divided by)
REL_EIG_FLOOR = 1e-9
NORM_EPS = 1e-12


def whitening_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(arrays, json) of the whitening ``path`` (given with or without ``.npz`` / ``.json``)."""
    p = Path(os.path.expanduser(str(path)))
    stem = p.with_suffix("") if p.suffix in (".npz", ".json") else p
    return stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".json")


def _check_matrix(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{what}: expected (N >= 2, D) descriptors, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: descriptors contain NaN or inf")
    return x


def _shrink(cov: np.ndarray, shrinkage: float) -> np.ndarray:
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"whitening shrinkage must be in [0, 1], got {shrinkage}")
    if shrinkage == 0:
        return cov
    target = np.trace(cov) / cov.shape[0]
    return (1.0 - shrinkage) * cov + shrinkage * target * np.eye(cov.shape[0])


def _eig_desc(sym: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric matrix."""
    vals, vecs = np.linalg.eigh((sym + sym.T) / 2)
    order = np.argsort(vals)[::-1]
    return vals[order], vecs[:, order]


def _keep(vals: np.ndarray, dim: int | None) -> int:
    """How many leading components to keep: ``dim`` (or all), never one with a numerically zero eigenvalue."""
    if dim is not None and not 1 <= int(dim) <= vals.size:
        raise ValueError(f"whitening dim must be in 1..{vals.size}, got {dim}")
    nonzero = int((vals > REL_EIG_FLOOR * max(float(vals[0]), 0.0)).sum()) if vals[0] > 0 else 0
    if nonzero == 0:
        raise ValueError("whitening: the learning descriptors have no variance (all equal)")
    return min(int(dim) if dim is not None else vals.size, nonzero)


def learn_pca(
    x: np.ndarray, dim: int | None = None, shrinkage: float = 0.0, power: float = 0.5
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """PCA-whitening of descriptors ``x`` (N, D): ``(mean (D,), projection (d, D), info)``."""
    x = _check_matrix(x, "learn_pca")
    if power < 0:
        raise ValueError(f"whitening power must be >= 0, got {power}")
    mean = x.mean(axis=0)
    xc = x - mean
    cov = _shrink(xc.T @ xc / x.shape[0], shrinkage)
    vals, vecs = _eig_desc(cov)
    d = _keep(vals, dim)
    proj = (vecs[:, :d] * vals[:d] ** -power).T
    info = {"images": int(x.shape[0]), "dropped_null_components": int(min(dim or vals.size, vals.size) - d)}
    return mean, proj, info


def learn_lw(
    x: np.ndarray, pairs: np.ndarray, dim: int | None = None, shrinkage: float = 0.0
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Learnt whitening (Lw) from matching ``pairs`` (P, 2) of rows of ``x`` (N, D): ``(mean, projection, info)``."""
    x = _check_matrix(x, "learn_lw")
    pairs = np.asarray(pairs)
    if (
        pairs.ndim != 2
        or pairs.shape[1] != 2
        or len(pairs) == 0
        or not np.issubdtype(pairs.dtype, np.integer)
    ):
        raise ValueError(f"learn_lw: pairs must be a non-empty (P, 2) integer array, got {pairs.shape}")
    if pairs.min() < 0 or pairs.max() >= len(x):
        raise ValueError(f"learn_lw: pair indices must lie in 0..{len(x) - 1}")
    mean = x[pairs[:, 0]].mean(axis=0)
    diff = x[pairs[:, 0]] - x[pairs[:, 1]]
    cs = _shrink(diff.T @ diff / len(diff), shrinkage)  # intra-class (matching-pair) covariance
    vals, vecs = _eig_desc(cs)
    keep = vals > REL_EIG_FLOOR * vals[0]
    if not keep.all():
        raise ValueError(
            f"learn_lw: the matching-pair covariance has rank {int(keep.sum())} < {x.shape[1]} "
            f"({len(pairs)} pairs); add pairs or set shrinkage > 0"
        )
    inv_sqrt = (vecs * vals**-0.5) @ vecs.T  # C_S^-1/2
    xw = (x - mean) @ inv_sqrt.T
    rot_vals, rot = _eig_desc(xw.T @ xw / len(x))  # PCA in the whitened space
    d = _keep(rot_vals, dim)
    proj = rot[:, :d].T @ inv_sqrt
    info = {
        "images": int(x.shape[0]),
        "pairs": int(len(pairs)),
        "dropped_null_components": int(min(dim or rot_vals.size, rot_vals.size) - d),
    }
    return mean, proj, info


def class_pairs(labels: Sequence[int], max_pairs_per_class: int | None = None, seed: int = 0) -> np.ndarray:
    """Matching pairs (i, j), i < j, of rows with equal labels: every pair of a class, or a random
    ``max_pairs_per_class`` of them (seeded), classes in label order. (P, 2) int64."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) < 2:
            continue
        i, j = np.triu_indices(len(rows), k=1)
        if max_pairs_per_class is not None and len(i) > max_pairs_per_class:
            pick = np.sort(rng.choice(len(i), size=int(max_pairs_per_class), replace=False))
            i, j = i[pick], j[pick]
        out.append(np.stack([rows[i], rows[j]], axis=1))
    if not out:
        raise ValueError("class_pairs: no class has two images; learnt whitening needs matching pairs")
    return np.concatenate(out).astype(np.int64)


@dataclass
class Whitening:
    """A learnt whitening: ``apply`` maps (N, D) descriptors to L2-normalised (N, d) ones."""

    mean: np.ndarray  # (D,) float32
    projection: np.ndarray  # (d, D) float32
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    sha256: str | None = None  # of the .npz: identifies the whitening in protocol records

    @property
    def dim_in(self) -> int:
        return int(self.projection.shape[1])

    @property
    def dim_out(self) -> int:
        return int(self.projection.shape[0])

    def describe(self) -> dict[str, Any]:
        """What goes into protocol records: which whitening, learnt how and on what."""
        return {
            "path": str(self.path) if self.path else None,
            "sha256": self.sha256,
            "method": self.meta.get("method"),
            "options": self.meta.get("options"),
            "dim": [self.dim_in, self.dim_out],
            "learned_on": self.meta.get("learned_on"),
        }

    def check_applies(
        self, dim: int, checkpoint_sha256: str | None, what: str, weights: str | None = None
    ) -> None:
        """Refuse descriptors it was not learnt for: another size, another checkpoint (when both are known), or the
        other weights of the same checkpoint (raw vs EMA average; ``weights`` None = not checked)."""
        where = f"whitening {self.path}" if self.path else "whitening"
        if int(dim) != self.dim_in:
            raise ValueError(f"{where} was learnt on {self.dim_in}-d descriptors; {what} are {dim}-d")
        mine = self.meta.get("checkpoint_sha256")
        if mine and checkpoint_sha256 and mine != checkpoint_sha256:
            raise ValueError(
                f"{where} was learnt on descriptors of checkpoint sha256 {mine[:12]}..., {what} come from "
                f"checkpoint sha256 {checkpoint_sha256[:12]}...; learn one for this checkpoint (src/whiten.py)"
            )
        learnt = self.meta.get("descriptor_fingerprint")
        if weights is not None and isinstance(learnt, dict):
            theirs = learnt.get("weights", "raw")  # stores record it only when not raw
            if theirs != weights:
                raise ValueError(
                    f"{where} was learnt on descriptors of the {theirs} weights, {what} come from the {weights} "
                    "weights of the checkpoint; learn one from a store of these weights or set weights="
                    f"{theirs}"
                )

    def apply(self, x: np.ndarray, chunk_size: int = 65536) -> np.ndarray:
        """``normalise(P (x - m))`` row-wise, float32; ``x`` may be a float16 memory map (read in chunks)."""
        if x.ndim != 2 or x.shape[1] != self.dim_in:
            raise ValueError(f"whitening expects (N, {self.dim_in}) descriptors, got shape {x.shape}")
        out = np.empty((x.shape[0], self.dim_out), dtype=np.float32)
        pt = np.ascontiguousarray(self.projection.T)
        for start in range(0, x.shape[0], chunk_size):
            y = (np.asarray(x[start : start + chunk_size], dtype=np.float32) - self.mean) @ pt
            y /= np.linalg.norm(y, axis=1, keepdims=True) + NORM_EPS
            out[start : start + len(y)] = y
        return out


def whitening_from_arrays(mean: np.ndarray, projection: np.ndarray, meta: Mapping[str, Any]) -> Whitening:
    mean = np.asarray(mean, dtype=np.float32)
    projection = np.asarray(projection, dtype=np.float32)
    if mean.ndim != 1 or projection.ndim != 2 or projection.shape[1] != mean.shape[0]:
        raise ValueError(f"whitening: mean {mean.shape} and projection {projection.shape} do not fit")
    if not (np.isfinite(mean).all() and np.isfinite(projection).all()):
        raise ValueError("whitening: mean or projection contains NaN or inf")
    return Whitening(mean=mean, projection=projection, meta=dict(meta))


def save_whitening(path: str | os.PathLike, whitening: Whitening) -> Path:
    """Write ``<stem>.npz`` then ``<stem>.json`` (the completion marker), each atomically. Returns the .npz path."""
    npz, js = whitening_paths(path)
    if js.exists():  # an old whitening is no longer complete while being replaced
        js.unlink()
    arrays = {
        "mean": whitening.mean.astype(np.float32),
        "projection": whitening.projection.astype(np.float32),
    }
    atomic_replace(lambda f: np.savez(f, **arrays), npz)
    sha = hashlib.sha256(npz.read_bytes()).hexdigest()
    info = {
        "format": FORMAT,
        "version": VERSION,
        "dim_in": whitening.dim_in,
        "dim_out": whitening.dim_out,
        "npz_sha256": sha,
        **whitening.meta,
    }
    write_json_atomic(info, js)
    whitening.path, whitening.sha256 = npz, sha
    return npz


def load_whitening(path: str | os.PathLike) -> Whitening:
    """Read a whitening written by :func:`save_whitening`; errors name the file (missing, partial, damaged,
    another format, arrays that do not match the json). Never unpickles."""
    npz, js = whitening_paths(path)
    if not js.exists():
        raise FileNotFoundError(f"whitening {npz} is missing or incomplete: no {js.name}")
    info = read_versioned_json(js, "whitening", FORMAT, VERSION, "file")
    try:
        data = npz.read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"whitening {npz} cannot be read: {e}") from e
    sha = hashlib.sha256(data).hexdigest()
    if sha != info.get("npz_sha256"):
        raise ValueError(f"whitening {npz} does not match {js.name} (sha256 differs): rewritten or damaged")
    try:
        with np.load(npz, allow_pickle=False) as arrays:
            mean, proj = arrays["mean"], arrays["projection"]
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise ValueError(f"whitening {npz} cannot be read as NumPy arrays mean/projection: {e}") from e
    meta = {
        k: v for k, v in info.items() if k not in ("format", "version", "dim_in", "dim_out", "npz_sha256")
    }
    try:
        w = whitening_from_arrays(mean, proj, meta)
    except ValueError as e:
        raise ValueError(f"{npz}: {e}") from e
    if (w.dim_in, w.dim_out) != (info.get("dim_in"), info.get("dim_out")):
        raise ValueError(f"{npz}: arrays are {w.dim_in} -> {w.dim_out}, {js.name} says otherwise")
    w.path, w.sha256 = npz, sha
    return w


def whiten_descriptors(
    x: np.ndarray, whitening: Whitening | None, what: str, checkpoint_sha256: str | None = None
) -> np.ndarray:
    """The one call the evaluation engine and search make on queries, database and distractors: ``x`` unchanged
    without a whitening, else checked (:meth:`Whitening.check_applies`) and whitened, float32."""
    if whitening is None:
        return x
    whitening.check_applies(x.shape[1], checkpoint_sha256, what)
    return whitening.apply(x)


def attach_to_store(store: str | os.PathLike, whitening: Whitening) -> Path:
    """Record ``whitening`` in a feature store's metadata (``meta["whitening"]``: path, sha256, method, dims), so
    that search applies it to the store and to its queries. The store's own descriptors stay as extracted; the
    whitening must fit them (checkpoint sha256 of the store's fingerprint, size). Returns the store's json."""
    from dalg.retrieval.features import load_features, store_paths

    loaded = load_features(store)
    recorded = loaded.meta.get("fingerprint") or {}
    whitening.check_applies(
        loaded.features.shape[1],
        recorded.get("checkpoint_sha256"),
        f"the descriptors of feature store {store}",
        recorded.get("weights", "raw") if recorded else None,  # raw or the EMA average (stores name only ema)
    )
    js = store_paths(store)[2]
    info = json.loads(js.read_text(encoding="utf-8"))
    info["meta"]["whitening"] = whitening.describe()
    write_json_atomic(info, js)
    return js


def whitening_of_store(meta: Mapping[str, Any], where: str) -> Whitening | None:
    """The whitening a store's metadata names (:func:`attach_to_store`), loaded and checked to be the same file
    (sha256); None when it names none. ``where`` names the store in errors."""
    entry = meta.get("whitening")
    if not entry:
        return None
    whitening = load_whitening(entry["path"])
    if whitening.sha256 != entry.get("sha256"):
        raise ValueError(
            f"{where} names whitening {entry['path']} with sha256 {str(entry.get('sha256'))[:12]}..., but that "
            f"file now has {str(whitening.sha256)[:12]}...: it was replaced; attach it again (src/whiten.py)"
        )
    return whitening
