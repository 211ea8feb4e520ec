"""Feature store: round trip, dtypes, atomic files, resuming after an interruption, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dalg.retrieval.features import FeatureWriter, load_features, save_features, store_paths


def _feats(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_save_and_load_round_trip(tmp_path, dtype: str) -> None:
    x, names = _feats(5), [f"img_{i}" for i in range(5)]
    arr = save_features(tmp_path / "db", x, names, dtype=dtype, meta={"model": "tiny"})
    assert arr == tmp_path / "db.npy"
    store = load_features(tmp_path / "db.npy")
    assert isinstance(store.features, np.memmap) and store.features.dtype == np.dtype(dtype)
    np.testing.assert_allclose(store.features, x, atol=1e-3 if dtype == "float16" else 0)
    assert store.names == names and store.meta == {"model": "tiny"}
    assert not list(tmp_path.glob("*.tmp"))  # no temp file left behind
    info = json.loads((tmp_path / "db.json").read_text())
    assert info["count"] == 5 and info["dim"] == 8 and info["dtype"] == dtype


def test_missing_or_inconsistent_store_is_reported(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="db.npy"):
        load_features(tmp_path / "db")
    save_features(tmp_path / "db", _feats(3), ["a", "b", "c"])
    _, names_p, _ = store_paths(tmp_path / "db")
    names_p.write_text("a\nb\n")
    with pytest.raises(ValueError, match="inconsistent"):
        load_features(tmp_path / "db")
    with pytest.raises(ValueError, match="3 feature rows but 2 names"):
        save_features(tmp_path / "x", _feats(3), ["a", "b"])
    with pytest.raises(ValueError, match="dtype"):
        save_features(tmp_path / "x", _feats(3), ["a", "b", "c"], dtype="int8")


def test_writer_resumes_after_interruption(tmp_path) -> None:
    x = _feats(10)
    names = [f"n{i}" for i in range(10)]
    w = FeatureWriter(tmp_path / "f", dim=8, dtype="float32", shard_size=3)
    w.add(x[:4], names[:4])  # one full shard of 4 rows on disk, nothing buffered
    w.add(x[4:5], names[4:5])  # buffered only: lost by the "crash"
    del w  # interrupted: no finalize

    with pytest.raises(FileNotFoundError, match="partial"):
        load_features(tmp_path / "f")
    w2 = FeatureWriter(tmp_path / "f", dim=8, dtype="float32", shard_size=3)
    assert w2.done == names[:4]
    todo = [i for i, n in enumerate(names) if not w2.is_done(n)]
    assert todo == list(range(4, 10))
    w2.add(x[todo], [names[i] for i in todo])
    w2.finalize(order=names)
    store = load_features(tmp_path / "f")
    assert store.names == names
    np.testing.assert_array_equal(store.features, x)
    assert not (tmp_path / "f.partial").exists()


def test_finalize_reorders_rows(tmp_path) -> None:
    x = _feats(4)
    w = FeatureWriter(tmp_path / "f", dim=8, dtype="float32", shard_size=2)
    w.add(x[[2, 0]], ["c", "a"])
    w.add(x[[3, 1]], ["d", "b"])
    w.finalize(order=["a", "b", "c", "d"])
    store = load_features(tmp_path / "f")
    np.testing.assert_array_equal(store.features, x)


def test_resume_refuses_a_different_dimension(tmp_path) -> None:
    w = FeatureWriter(tmp_path / "f", dim=8, shard_size=1)
    w.add(_feats(1), ["a"])
    with pytest.raises(ValueError, match="cannot resume"):
        FeatureWriter(tmp_path / "f", dim=16)


def test_half_written_shard_is_redone(tmp_path) -> None:
    w = FeatureWriter(tmp_path / "f", dim=8, shard_size=1)
    w.add(_feats(2), ["a", "b"])
    # simulate a crash between the shard's array and its names file
    (tmp_path / "f.partial" / "shard_000000.names.txt").unlink()
    w2 = FeatureWriter(tmp_path / "f", dim=8, shard_size=1)
    assert w2.done == []
