"""The validation callback in a real (1-process) Lightning validate: metrics to every logger, grid image."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, Logger
from torch.utils.data import DataLoader

from dalg.data.datamodules import EvalSet
from dalg.data.revisited import RevisitedImages, load_ground_truth
from dalg.data.transforms import eval_transform
from dalg.retrieval.callback import RetrievalEvalCallback
from dalg.retrieval.index import search
from dalg.retrieval.metrics import evaluate_revisited

N_Q, N_DB, DIM = 3, 9, 8


def _write_set(root: Path, n_db: int = N_DB) -> None:
    rng = np.random.default_rng(0)
    (root / "jpg").mkdir(parents=True)
    qim, im = [f"q{i}" for i in range(N_Q)], [f"d{i}" for i in range(n_db)]
    for name in qim + im:
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(root / "jpg" / f"{name}.jpg")
    gnd = [
        {"bbx": [0.0, 0.0, 20.0, 16.0], "easy": [3 * i], "hard": [3 * i + 1], "junk": [3 * i + 2]}
        for i in range(N_Q)
    ]
    with open(root / "gnd_tiny.pkl", "wb") as f:
        pickle.dump({"imlist": im, "qimlist": qim, "gnd": gnd}, f)


def _table(n: int = N_Q + N_DB) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.normalize(torch.randn(n, DIM, generator=g), dim=1)


class _Module(pl.LightningModule):
    """Descriptors are a fixed function of the dataset index (so the expected scores are known)."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        _, index = batch
        return {"descriptors": _table(64)[index], "index": index}


class _Data(pl.LightningDataModule):
    def __init__(self, root: Path):
        super().__init__()
        gt = load_ground_truth(root, "tiny")
        self.eval_sets = [EvalSet("tiny", gt, RevisitedImages(gt, eval_transform(32), True), 32, True)]

    def val_dataloader(self):
        return [DataLoader(s.dataset, batch_size=1) for s in self.eval_sets]  # cropped queries differ in size


class _ImageLogger(Logger):
    """Records log_image calls as W&B's logger would receive them."""

    def __init__(self):
        super().__init__()
        self.images: list[tuple[str, list[str]]] = []
        self.image_steps: list[int] = []
        self.metric_steps: dict[str, int] = {}

    @property
    def name(self):
        return "images"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.metric_steps.update({k: step for k in metrics})

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_image(self, key, images, step=None):
        self.images.append((key, images))
        self.image_steps.append(step)


def test_callback_logs_scores_and_grid_to_every_logger(tmp_path) -> None:
    _write_set(tmp_path / "tiny")
    csv_logger, img_logger = CSVLogger(tmp_path / "csv", name="run"), _ImageLogger()
    callback = RetrievalEvalCallback(grid_queries=2, grid_top_k=4, output_dir=str(tmp_path / "grids"))
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=[csv_logger, img_logger],
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.validate(_Module(), datamodule=_Data(tmp_path / "tiny"), verbose=False)

    table = _table(64).numpy()[: N_Q + N_DB]
    gt = load_ground_truth(tmp_path / "tiny", "tiny")
    _, ranks = search(table[:N_Q], table[N_Q:])
    expected = evaluate_revisited(ranks, gt.gnd).as_dict()
    assert callback.results["tiny"].as_dict() == pytest.approx(expected)
    for key, value in expected.items():
        assert float(trainer.callback_metrics[f"val/tiny/{key}"]) == pytest.approx(value, abs=1e-4)

    rows = list(csv.DictReader(open(Path(csv_logger.log_dir) / "metrics.csv")))
    assert float(rows[-1]["val/tiny/mAP_M"]) == pytest.approx(expected["mAP_M"], abs=1e-4)
    assert {"val/tiny/mP@1_E", "val/tiny/mP@10_H"} <= rows[-1].keys()
    assert callback.last_grid is not None and callback.last_grid.is_file()
    assert (Path(csv_logger.log_dir) / "images" / callback.last_grid.name).is_file()
    assert img_logger.images == [("val/tiny/top4_M", [str(callback.last_grid)])]
    assert Image.open(callback.last_grid).size == (5 * 96, 2 * 96)
    # the images and the metrics of one validation reach the logger at one step, the one last_results has
    assert img_logger.image_steps == [callback.last_step] == [img_logger.metric_steps["val/tiny/mAP_M"]]

    result = callback.last_results["tiny"]  # the SetResult other callbacks read
    assert result.name == "tiny" and result.scores.as_dict() == pytest.approx(expected)
    np.testing.assert_array_equal(result.ranks, ranks[:, : result.ranks.shape[1]])
    assert result.ranks.shape[1] >= 4 and result.protocol["crop_queries"] is True
    assert result.protocol["test_size"] == 32 and result.protocol["ranking"] == "full"
    assert result.query_paths == [str(tmp_path / "tiny" / "jpg" / f"q{i}.jpg") for i in range(N_Q)]
    assert result.database_paths[0] == str(tmp_path / "tiny" / "jpg" / "d0.jpg")
    assert len(result.database_paths) == N_DB and result.gnd == gt.gnd
    assert result.query_boxes == [[0.0, 0.0, 20.0, 16.0]] * N_Q
    assert result.to_json()["n_queries"] == N_Q


def test_limited_validation_skips_scoring_instead_of_failing(tmp_path) -> None:
    _write_set(tmp_path / "tiny")
    callback = RetrievalEvalCallback(grid_queries=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        callbacks=[callback],
        limit_val_batches=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.warns(UserWarning, match="not scored"):
        trainer.validate(_Module(), datamodule=_Data(tmp_path / "tiny"), verbose=False)
    assert callback.results == {}


class _SavingCallback(RetrievalEvalCallback):
    """Each process saves the descriptors it gathered (the processes are spawned: no shared objects)."""

    def __init__(self, out: str, **kwargs):
        super().__init__(keep_features=True, **kwargs)
        self.out = out

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        super().on_validation_epoch_end(trainer, pl_module)
        np.save(f"{self.out}/feats_rank{trainer.global_rank}.npy", self.features["tiny"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lightning_ddp_two_cpu_processes_gather_all_descriptors(tmp_path) -> None:
    # 3 queries + 10 database images = 13 on 2 processes: Lightning's DistributedSampler pads one duplicate
    _write_set(tmp_path / "tiny", n_db=10)
    cb = _SavingCallback(str(tmp_path), grid_queries=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=CSVLogger(tmp_path, name="run"),
        callbacks=[cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.validate(_Module(), datamodule=_Data(tmp_path / "tiny"), verbose=False)
    expected = _table(64).numpy()[:13]
    for rank in (0, 1):
        np.testing.assert_array_equal(np.load(tmp_path / f"feats_rank{rank}.npy"), expected)
    gt = load_ground_truth(tmp_path / "tiny", "tiny")
    _, ranks = search(expected[:N_Q], expected[N_Q:])
    (metrics_csv,) = (tmp_path / "run").glob("version_*/metrics.csv")  # written by rank 0
    rows = list(csv.DictReader(open(metrics_csv)))
    assert float(rows[-1]["val/tiny/mAP_M"]) == pytest.approx(
        evaluate_revisited(ranks, gt.gnd).map["M"], abs=1e-4
    )


def test_descriptor_buffer_keeps_batches_per_dataloader_and_skips_non_descriptors():
    from dalg.retrieval.gather import DescriptorBuffer

    buf = DescriptorBuffer()
    buf.add({"index": torch.tensor([2, 0]), "descriptors": torch.ones(2, 3)}, 1)
    buf.add(None, 2)  # the classification hold-out returns nothing
    buf.add({"index": torch.tensor([1]), "descriptors": torch.zeros(1, 3)}, 1)
    index, desc = buf.tensors(1)
    assert index.tolist() == [2, 0, 1] and desc.shape == (3, 3)
    assert not buf.has(2) and not buf.has(0)
    empty_index, empty_desc = buf.tensors(0)
    assert empty_index.shape == (0,) and empty_index.dtype == torch.long and empty_desc.shape[0] == 0
    buf.clear()
    assert not buf.has(1)
