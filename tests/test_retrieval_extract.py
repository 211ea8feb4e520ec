"""src/extract.py: a folder of images -> feature store; resumes; skips and lists unreadable files."""

from __future__ import annotations

import importlib.util
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from PIL import Image

from dalg.retrieval.features import load_features
from dalg.utils.lock import LockHeldError
from tests.conftest import CONF, REPO
from tests.test_retrieval_eval import tiny_ckpt  # noqa: F401  (fixture)
from tests.test_utils_lock import hold_lock


def _extract_module():
    spec = importlib.util.spec_from_file_location("dalg_extract_entry", REPO / "src" / "extract.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _images(root: Path) -> list[str]:
    """Five readable images, one that fails at the header and one truncated JPEG that fails only while
    decoding (it shares a size bucket with img2); returns the readable names, sorted."""
    rng = np.random.default_rng(0)
    names = []
    for i, (w, h) in enumerate([(40, 30), (40, 30), (30, 40), (40, 30), (32, 32)]):
        name = f"{'sub/' if i % 2 else ''}img{i}.jpg"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / name)
        names.append(name)
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (80, 60, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (root / TRUNCATED).write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    return sorted(names)


TRUNCATED = (
    "img1_trunc.jpg"  # list rows: broken 0, img0 1, img1_trunc 2, img2 3, img4 4, sub/img1 5, sub/img3 6
)


def _cfg(overrides: list[str], out: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="extract", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


class _Stop(Exception):
    pass


def _stop_after_batches(ex, monkeypatch, n: int) -> None:
    """Make the extraction die after ``n`` batches (the writer keeps what was extracted, as after a kill)."""
    original = ex.StoreWriterCallback.on_validation_batch_end
    seen = []

    def stop(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(1)
        if len(seen) >= n:
            raise _Stop

    monkeypatch.setattr(ex.StoreWriterCallback, "on_validation_batch_end", stop)


def _overrides(ckpt: Path, tmp_path: Path) -> list[str]:
    return [
        f"ckpt_path={ckpt}",
        f"images={tmp_path / 'imgs'}",
        f"output={tmp_path / 'feats'}",
        "test_size=48",
        "batch_size=2",
        "num_workers=0",
        "trainer.accelerator=cpu",
        "dtype=float32",
        "shard_size=2",
    ]


def test_extract_folder_resume_and_skip(tiny_ckpt, tmp_path, monkeypatch, capsys) -> None:  # noqa: F811
    ex = _extract_module()
    names = _images(tmp_path / "imgs")
    over = _overrides(tiny_ckpt, tmp_path)
    _stop_after_batches(ex, monkeypatch, 1)  # the first batch is img0 alone (row 1; block 0-1)
    with pytest.raises(_Stop):
        ex.extract(_cfg(over, tmp_path))
    monkeypatch.undo()
    partial = tmp_path / "feats.partial"
    assert sorted(p.name for p in partial.glob("rows_*.npy")) == ["rows_000001-000001.npy"]
    # resume must keep the earlier rows, not redo them: mark them
    marker = np.full((1, 512), 0.5, np.float32)
    np.save(partial / "rows_000001-000001.npy", marker)

    out = ex.extract(_cfg(over, tmp_path))
    store = load_features(out)
    assert store.names == names  # list order; the header failure and the truncated JPEG left out
    np.testing.assert_array_equal(store.features[names.index("img0.jpg")], marker[0])
    others = np.asarray(store.features[[i for i, n in enumerate(names) if n != "img0.jpg"]])
    np.testing.assert_allclose(np.linalg.norm(others, axis=1), 1.0, atol=1e-5)
    skipped = store.meta["skipped"]
    assert [s["name"] for s in skipped] == ["broken.jpg", TRUNCATED]
    assert "truncated" in skipped[1]["reason"]
    listed = (tmp_path / "feats.skipped.txt").read_text()
    assert "broken.jpg" in listed and TRUNCATED in listed
    printed = capsys.readouterr().out
    assert "2 unreadable images skipped" in printed and TRUNCATED in printed
    assert store.meta["test_size"] == 48 and store.meta["scales"] == [1.0]
    assert store.meta["fingerprint"]["config"]["test_size"] == 48
    assert not partial.exists() and not (tmp_path / "feats.lock").exists()

    # the same command again: complete (the skipped images do not make it look like another image list)
    assert ex.extract(_cfg(over, tmp_path)) == out
    assert "already complete" in capsys.readouterr().out

    # same image -> same descriptor as a fresh single-image extraction from a list file (img2 shared its batch
    # with the truncated image's zero placeholder)
    (tmp_path / "list.txt").write_text("img2.jpg\n")
    over2 = [o for o in over if not o.startswith(("images=", "output="))]
    out2 = ex.extract(
        _cfg(
            over2
            + [
                f"images={tmp_path / 'list.txt'}",
                f"image_root={tmp_path / 'imgs'}",
                f"output={tmp_path / 'one'}",
            ],
            tmp_path,
        )
    )
    np.testing.assert_allclose(
        load_features(out2).features[0], store.features[names.index("img2.jpg")], atol=1e-5
    )


def test_extract_refuses_to_mix_settings(tiny_ckpt, tmp_path, monkeypatch) -> None:  # noqa: F811
    ex = _extract_module()
    _images(tmp_path / "imgs")
    (tmp_path / "list.txt").write_text("img0.jpg\nimg2.jpg\n")  # two size buckets: two batches
    over = [o for o in _overrides(tiny_ckpt, tmp_path) if not o.startswith("images=")]
    over += [f"images={tmp_path / 'list.txt'}", f"image_root={tmp_path / 'imgs'}"]
    _stop_after_batches(ex, monkeypatch, 1)
    with pytest.raises(_Stop):
        ex.extract(_cfg(over, tmp_path))
    monkeypatch.undo()

    # resumed with another checkpoint (same model, other weights) at another size: refused, both named
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    key = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][key] += 1
    torch.save(ckpt, tmp_path / "other.ckpt")
    other = [o for o in over if not o.startswith(("ckpt_path=", "test_size="))]
    other += [f"ckpt_path={tmp_path / 'other.ckpt'}", "test_size=32"]
    with pytest.raises(ValueError, match="cannot resume") as err:
        ex.extract(_cfg(other, tmp_path))
    assert re.search("checkpoint_sha256: '[0-9a-f]{64}' vs '[0-9a-f]{64}'", str(err.value))
    assert "config.test_size: 48 vs 32" in str(err.value)
    smaller = [o for o in over if not o.startswith("test_size=")] + ["test_size=32"]

    out = ex.extract(_cfg(over, tmp_path))  # the original settings resume and finish
    with pytest.raises(FileExistsError, match="config.test_size: 48 vs 32.*overwrite=true"):
        ex.extract(_cfg(smaller, tmp_path))  # a complete store of other settings is not "already complete"
    assert load_features(out).meta["fingerprint"]["config"]["test_size"] == 48


def test_second_extraction_on_one_output_is_refused(tiny_ckpt, tmp_path) -> None:  # noqa: F811
    ex = _extract_module()
    _images(tmp_path / "imgs")
    holder = hold_lock(tmp_path / "feats.lock")  # another extraction writing the same output
    try:
        with pytest.raises(LockHeldError, match=rf"feature store .*feats.npy is in use .*pid {holder.pid} "):
            ex.extract(_cfg(_overrides(tiny_ckpt, tmp_path), tmp_path))
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "feats.partial").exists() and not (tmp_path / "feats.json").exists()


def test_truncated_jpeg_stops_the_run_when_asked(tiny_ckpt, tmp_path) -> None:  # noqa: F811
    ex = _extract_module()
    _images(tmp_path / "imgs")
    (tmp_path / "list.txt").write_text(f"img2.jpg\n{TRUNCATED}\n")
    over = [o for o in _overrides(tiny_ckpt, tmp_path) if not o.startswith("images=")]
    over += [f"images={tmp_path / 'list.txt'}", f"image_root={tmp_path / 'imgs'}", "skip_unreadable=false"]
    with pytest.raises(Exception, match=f"{TRUNCATED}.*truncated"):
        ex.extract(_cfg(over, tmp_path))


def test_extract_refuses_unreadable_when_asked(tiny_ckpt, tmp_path) -> None:  # noqa: F811
    ex = _extract_module()
    _images(tmp_path / "imgs")
    over = [
        f"ckpt_path={tiny_ckpt}",
        f"images={tmp_path / 'imgs'}",
        f"output={tmp_path / 'f'}",
        "skip_unreadable=false",
        "num_workers=0",
        "trainer.accelerator=cpu",
    ]
    with pytest.raises(Exception, match="broken.jpg"):
        ex.extract(_cfg(over, tmp_path))
