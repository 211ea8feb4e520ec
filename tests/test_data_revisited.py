"""Revisited-layout evaluation sets: the DataModule, aspect-ratio batches, distributed sampling, missing files."""

import pickle
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from lightning_fabric.utilities.data import _replace_dunder_methods
from PIL import Image
from pytorch_lightning.trainer.states import RunningStage
from pytorch_lightning.utilities.data import _update_dataloader
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from dalg.data.datamodules import RevisitedDataModule
from dalg.data.images import ImageReadError
from dalg.data.revisited import load_ground_truth
from dalg.utils.safe_pickle import load_plain_pickle
from tests.conftest import LANDMARKS_MINI, compose_train

SIZES = [(64, 48), (48, 64), (64, 48), (60, 40), (64, 48), (48, 64), (64, 48), (60, 40), (64, 48)]


def _write_set(root: Path, name: str = "toy", sizes=SIZES, n_queries: int = 2) -> Path:
    (root / "jpg").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"im{i}" for i in range(len(sizes))]
    for n, (w, h) in zip(names, sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "jpg" / f"{n}.jpg")
    qimlist, imlist = names[:n_queries], names[n_queries:]
    gnd = [{"bbx": [4.0, 2.0, 40.0, 30.0], "easy": [0], "hard": [1], "junk": []} for _ in qimlist]
    with open(root / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
    return root


def test_revisited_datamodule_reads_any_set_by_name(tmp_path):
    _write_set(tmp_path / "mine", "mine")
    for root in (tmp_path / "mine", tmp_path):  # the set's folder, or its parent
        dm = RevisitedDataModule(root=str(root), name="mine", eval_batch_size=4, num_workers=0, test_size=512)
        dm.setup("validate")
        (s,) = dm.eval_sets
        assert s.name == "mine" and s.gt.n_queries == 2 and s.gt.n_database == 7 and dm.monitor_set == "mine"
        assert s.dataset.load(0).size == (36, 28)  # cropped to bbx


def test_revisited_config_data_root_and_name(tmp_path):
    _write_set(tmp_path / "oxf", "roxford5k")
    cfg = compose_train(
        ["data=roxford5k", f"data.root={tmp_path / 'oxf'}", "data.eval_sets.main.crop_queries=false"],
        tmp_path / "out",
    )
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("validate")
    (s,) = dm.eval_sets
    assert s.name == "roxford5k" and not s.crop_queries and s.dataset.load(0).size == (64, 48)
    assert s.test_size == 512  # conf/data/eval/defaults.yaml
    assert cfg.optimized_metric == "val/roxford5k/mAP_M"
    # src/eval.py's options apply to every set, after the config is instantiated (the config stays as it is)
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup_evaluation({}, crop_queries=True, test_size="original")
    (s,) = dm.eval_sets
    assert s.crop_queries and s.test_size is None and s.dataset.load(0).size == (36, 28)
    assert cfg.data.eval_sets.main.crop_queries is False


def test_missing_required_set_and_missing_images_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="gnd_nothere.pkl"):
        RevisitedDataModule(root=str(tmp_path), name="nothere", test_size=64).setup("validate")
    _write_set(tmp_path / "t")
    (tmp_path / "t" / "jpg" / "im3.jpg").unlink()
    (tmp_path / "t" / "jpg" / "im5.jpg").write_bytes(b"")
    dm = RevisitedDataModule(root=str(tmp_path / "t"), name="toy", num_workers=0, test_size=64)
    dm.setup("validate")
    with pytest.raises(ImageReadError, match=r"2 of 9 images unreadable.*im3\.jpg.*im5\.jpg"):
        dm.val_dataloader()


def test_bad_bbx_is_rejected(tmp_path):
    _write_set(tmp_path)
    raw = load_plain_pickle(tmp_path / "gnd_toy.pkl")
    raw["gnd"][1]["bbx"] = [10, 10, 5, 20]
    with open(tmp_path / "gnd_toy.pkl", "wb") as f:
        pickle.dump(raw, f)
    with pytest.raises(ValueError, match="query 1 .*bbx"):
        load_ground_truth(tmp_path, "toy")


class _ConvDescriptor(torch.nn.Module):
    """Small CNN + BatchNorm (eval) + GeM + L2: cheap, and batch-size dependent if anything in the path is."""

    embed_dim = 16

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, 2, 1),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, 2, 1),
            torch.nn.ReLU(),
        )

    def forward(self, x):
        f = self.body(x).clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)
        return torch.nn.functional.normalize(f, dim=-1)


def _descriptors(model, loader: DataLoader, n: int) -> torch.Tensor:
    out = torch.full((n, model.embed_dim), float("nan"))
    with torch.no_grad():
        for images, index in loader:
            out[index] = model(images)
    return out


def _check_batch_invariance(tmp_path, model) -> None:
    _write_set(tmp_path)
    dm = RevisitedDataModule(root=str(tmp_path), name="toy", eval_batch_size=4, num_workers=0, test_size=48)
    dm.setup("validate")
    loader = dm.val_dataloader()[0]
    batches = list(loader.batch_sampler)
    assert max(len(b) for b in batches) > 1  # some batches really hold several images
    sizes = dm.eval_sizes(dm.eval_sets[0])
    for b in batches:
        assert len({sizes[i] for i in b}) == 1
    n = len(dm.eval_sets[0].dataset)
    batched = _descriptors(model, loader, n)
    dm.eval_batch_size = 1
    single = _descriptors(model, dm.val_dataloader()[0], n)
    assert not torch.isnan(batched).any()
    assert torch.allclose(batched, single, atol=1e-4), (batched - single).abs().max()


def test_descriptor_does_not_depend_on_its_batch(tmp_path):
    """Aspect-ratio buckets: same descriptors from batches of 4 as from one image at a time (within 1e-4)."""
    torch.manual_seed(0)
    _check_batch_invariance(tmp_path, _ConvDescriptor().eval())


@pytest.mark.slow
def test_dalg_descriptor_does_not_depend_on_its_batch(tmp_path):
    """The same with the project's DALG (tiny config): ~25 s on a loaded 2-core machine, mostly building it."""
    cfg = compose_train(["model=dalg_tiny"], tmp_path / "out")
    torch.manual_seed(0)
    _check_batch_invariance(tmp_path, hydra.utils.instantiate(cfg.model).eval())


def test_lightning_can_inject_a_distributed_sampler(tmp_path):
    """Under DDP Lightning rebuilds the batch sampler around a DistributedSampler: every image is still covered,
    and every batch still holds one size."""
    _write_set(tmp_path)
    dm = RevisitedDataModule(root=str(tmp_path), name="toy", eval_batch_size=2, num_workers=0, test_size=32)
    dm.setup("validate")
    sizes = dm.eval_sizes(dm.eval_sets[0])
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = dm.val_dataloader()[0]  # as Lightning calls the hook: init arguments recorded
    seen = []
    for rank in range(2):
        dist = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=False)
        rebuilt = _update_dataloader(loader, dist, mode=RunningStage.VALIDATING)
        assert rebuilt.batch_sampler.sampler is dist
        for batch in rebuilt.batch_sampler:
            assert len({sizes[i] for i in batch}) == 1 and len(batch) <= 2
            seen += batch
    assert set(seen) == set(range(len(sizes)))  # padded shares repeat one image; none is lost


@pytest.mark.skipif(not (LANDMARKS_MINI / "gnd_landmarks-mini.pkl").is_file(), reason="../shared not present")
def test_landmarks_mini_config_loads_real_photos(tmp_path):
    cfg = compose_train(["data=landmarks_mini"], tmp_path / "out")
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("validate")
    (s,) = dm.eval_sets
    assert s.name == "landmarks_mini" and s.test_size == 224 and s.crop_queries
    q = 0
    x1, y1, x2, y2 = (round(v) for v in s.gt.gnd[q]["bbx"])
    assert s.dataset.load(q).size == (x2 - x1, y2 - y1)
    image, index = s.dataset[s.gt.n_queries]
    assert index == s.gt.n_queries and max(image.shape[1:]) == 224
