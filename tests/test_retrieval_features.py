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
    w = FeatureWriter(tmp_path / "f", names, dim=8, dtype="float32", shard_size=4)
    w.add(x[:4], names[:4])  # one full shard of 4 rows on disk, nothing buffered
    w.add(x[4:5], names[4:5])  # buffered only: lost by the "crash"
    del w  # interrupted: no finalize

    with pytest.raises(FileNotFoundError, match="partial"):
        load_features(tmp_path / "f")
    assert sorted(p.name for p in (tmp_path / "f.partial").glob("rows_*.npy")) == ["rows_000000-000003.npy"]
    w2 = FeatureWriter(tmp_path / "f", names, dim=8, dtype="float32", shard_size=4)
    assert w2.done == names[:4]
    todo = [i for i, n in enumerate(names) if not w2.is_done(n)]
    assert todo == list(range(4, 10))
    w2.add(x[todo], [names[i] for i in todo])
    w2.finalize()
    store = load_features(tmp_path / "f")
    assert store.names == names
    np.testing.assert_array_equal(store.features, x)
    assert store.meta["skipped"] == [] and store.meta["fingerprint"]["images"] == 10
    assert not (tmp_path / "f.partial").exists()


def test_finalize_puts_rows_in_list_order(tmp_path) -> None:
    x = _feats(4)
    w = FeatureWriter(tmp_path / "f", ["a", "b", "c", "d"], dim=8, dtype="float32", shard_size=2)
    w.add(x[[2, 0]], ["c", "a"])  # rows of two blocks in one call: split into one shard per block
    w.add(x[[3, 1]], ["d", "b"])
    w.finalize()
    store = load_features(tmp_path / "f")
    np.testing.assert_array_equal(store.features, x)


def test_resume_refuses_other_settings_and_names_them(tmp_path) -> None:
    fp = {"checkpoint_sha256": "aaa", "test_size": 512, "inference": {"bf16": False}}
    w = FeatureWriter(tmp_path / "f", ["a", "b"], dim=8, shard_size=1, fingerprint=fp)
    w.add(_feats(1), ["a"])
    other = {"checkpoint_sha256": "bbb", "test_size": 224, "inference": {"bf16": False}}
    with pytest.raises(ValueError, match="cannot resume") as err:
        FeatureWriter(tmp_path / "f", ["a", "b"], dim=8, fingerprint=other)
    msg = str(err.value)
    assert "checkpoint_sha256: 'aaa' vs 'bbb'" in msg and "test_size: 512 vs 224" in msg and "bf16" not in msg
    with pytest.raises(ValueError, match="dim: 8 vs 16"):
        FeatureWriter(tmp_path / "f", ["a", "b"], dim=16, fingerprint=fp)
    with pytest.raises(ValueError, match="image_list_sha256"):
        FeatureWriter(tmp_path / "f", ["a", "c"], dim=8, fingerprint=fp)
    assert FeatureWriter(tmp_path / "f", ["a", "b"], dim=8, fingerprint=dict(fp)).done == ["a"]
    (tmp_path / "old.partial").mkdir()  # started by the version that recorded only dim and dtype
    (tmp_path / "old.partial" / "info.json").write_text('{"dim": 8, "dtype": "float16"}')
    with pytest.raises(ValueError, match="older version"):
        FeatureWriter(tmp_path / "old", ["a", "b"], dim=8, fingerprint=fp)


def test_half_written_shard_is_redone(tmp_path) -> None:
    w = FeatureWriter(tmp_path / "f", ["a", "b"], dim=8, shard_size=1)
    w.add(_feats(2), ["a", "b"])
    # simulate a crash between the shard's array and its names file
    (tmp_path / "f.partial" / "rows_000000-000000.names.txt").unlink()
    w2 = FeatureWriter(tmp_path / "f", ["a", "b"], dim=8, shard_size=1)
    assert w2.done == ["b"]


def test_lost_shard_is_extracted_again_without_shifting_other_rows(tmp_path) -> None:
    x, names = _feats(8), [f"n{i}" for i in range(8)]
    w = FeatureWriter(tmp_path / "f", names, dim=8, dtype="float32", shard_size=2)
    w.add(x[:6], names[:6])
    w.flush()
    (tmp_path / "f.partial" / "rows_000002-000003.npy").unlink()  # a shard goes missing, its names file stays
    w2 = FeatureWriter(tmp_path / "f", names, dim=8, dtype="float32", shard_size=2)
    todo = [i for i, n in enumerate(names) if not w2.is_done(n)]
    assert todo == [2, 3, 6, 7]
    w2.add(x[todo], [names[i] for i in todo])
    w2.finalize()
    store = load_features(tmp_path / "f")
    assert store.names == names
    np.testing.assert_array_equal(store.features, x)  # every descriptor under its own name


def test_finalize_refuses_missing_or_repeated_rows(tmp_path) -> None:
    x, names = _feats(6), [f"n{i}" for i in range(6)]
    w = FeatureWriter(tmp_path / "f", names, dim=8, dtype="float32", shard_size=2)
    w.add(x, names)
    (tmp_path / "f.partial" / "rows_000002-000003.npy").unlink()  # lost after this writer scanned the folder
    with pytest.raises(ValueError, match=r"2 rows are in no shard: 2-3 \(n2 \.\. n3\)"):
        w.finalize()
    assert not (tmp_path / "f.json").exists()

    w = FeatureWriter(tmp_path / "g", names, dim=8, dtype="float32", shard_size=2)
    w.add(x, names)
    np.save(tmp_path / "g.partial" / "rows_000000-000003.npy", x[:4])  # e.g. left by another writer
    (tmp_path / "g.partial" / "rows_000000-000003.names.txt").write_text("".join(f"{n}\n" for n in names[:4]))
    with pytest.raises(ValueError, match=r"4 rows are in more than one shard: 0-3 .*rows_000000-000003.npy"):
        w.finalize()


def test_skipped_rows_are_left_out_and_listed(tmp_path) -> None:
    x, names = _feats(3), ["a", "b", "c"]
    w = FeatureWriter(tmp_path / "f", names, dim=8, dtype="float32", shard_size=2)
    w.add(x[[0, 2]], ["a", "c"])
    w.skip("b", "truncated file")
    w.finalize()
    store = load_features(tmp_path / "f")
    assert store.names == ["a", "c"] and store.features.shape == (2, 8)
    np.testing.assert_array_equal(store.features, x[[0, 2]])
    assert store.meta["skipped"] == [{"name": "b", "reason": "truncated file"}]
