"""GLDv2 training data: list formats, relabelling, validation split, label map, and unreadable files counted
over DataLoader workers and reported once per epoch."""

import json
import logging

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from dalg.data.datamodules import RetrievalDataModule
from dalg.data.gldv2 import GLDv2Dataset, image_path, read_gldv2_csv


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:x}".rjust(16, "0") for i in range(n)]


def _write(root, classes: dict[str, list[str]], broken=(), missing=(), size=(24, 18)):
    rows = []
    for lid, ids in classes.items():
        for i in ids:
            p = image_path(root, i)
            p.parent.mkdir(parents=True, exist_ok=True)
            if i in missing:
                continue
            if i in broken:
                p.write_bytes(b"\xff\xd8 not really a jpeg")
            else:
                Image.new("RGB", size, (int(lid) % 256, 40, 90)).save(p)
        rows.append(f"{lid},{' '.join(ids)}")
    (root / "train_clean.csv").write_text("landmark_id,images\n" + "\n".join(rows) + "\n")


def test_train_csv_format_groups_ids_and_drops_duplicates(tmp_path):
    (tmp_path / "train.csv").write_text(
        "\ufeffid,url,landmark_id\naaaa,http://x/1.jpg,12\nbbbb,http://x/2.jpg,3\naaaa,http://x/1.jpg,12\n"
    )
    assert read_gldv2_csv(tmp_path / "train.csv") == {"12": ["aaaa"], "3": ["bbbb"]}


def test_unknown_columns_are_named(tmp_path):
    (tmp_path / "train_clean.csv").write_text("label,files\n1,a\n")
    with pytest.raises(ValueError, match="unknown columns"):
        read_gldv2_csv(tmp_path / "train_clean.csv")


def test_train_csv_gives_the_same_dataset_as_train_clean(tmp_path):
    ids = _ids("a", 3)
    _write(tmp_path, {"7": ids[:2], "2": ids[2:]})
    (tmp_path / "train.csv").write_text(
        "id,url,landmark_id\n"
        + "".join(f"{i},u,{lid}\n" for lid, group in (("7", ids[:2]), ("2", ids[2:])) for i in group)
    )
    clean, full = GLDv2Dataset(tmp_path), GLDv2Dataset(tmp_path, "train.csv")
    assert clean.label_map == full.label_map == {"2": 0, "7": 1}
    assert sorted(clean.samples) == sorted(full.samples)


def test_validation_split_never_takes_a_class_only_image(tmp_path):
    classes = {"1": _ids("1", 1), "2": _ids("2", 2), "3": _ids("3", 10)}
    _write(tmp_path, classes)
    full = GLDv2Dataset(tmp_path)
    train, val = full.split(0.5, seed=3)
    train_ids = {s for s, _ in train.samples}
    val_ids = {s for s, _ in val.samples}
    assert not train_ids & val_ids and train_ids | val_ids == {s for s, _ in full.samples}
    assert classes["1"][0] in train_ids  # the only image stays in train
    per_class_val = {lid: sum(i in val_ids for i in ids) for lid, ids in classes.items()}
    assert per_class_val == {"1": 0, "2": 1, "3": 5}
    assert train.label_map is full.label_map and val.num_classes == full.num_classes
    again = {s for s, _ in full.split(0.5, seed=3)[1].samples}
    assert again == val_ids  # deterministic for a seed
    assert val[0][1] == val.samples[0][1]


def test_datamodule_writes_label_map_and_val_split(tmp_path):
    _write(tmp_path, {"40": _ids("4", 3), "5": _ids("5", 2)})
    dm = RetrievalDataModule(
        root=str(tmp_path), train_size=16, batch_size=2, num_workers=0, val_fraction=0.34
    )
    dm.setup("fit")
    assert dm.num_classes == 2 and len(dm.val_set) == 2 and len(dm.train_set) == 3
    out = dm.save_label_map(tmp_path / "ckpt")
    assert json.loads(out.read_text()) == {"5": 0, "40": 1}
    assert [p.name for p in out.parent.iterdir()] == ["label_map.json"]  # no temp file left behind
    images, labels = next(iter(dm.classification_val_dataloader()))
    assert images.shape[1:] == (3, 16, 16) and len(labels) == 2


def test_prescan_drops_missing_files_and_names_empty_classes(tmp_path, caplog):
    good, gone = _ids("a", 2), _ids("b", 2)
    _write(tmp_path, {"1": good + [gone[0]], "2": [gone[1]]}, missing=gone)
    with caplog.at_level(logging.WARNING):
        ds = GLDv2Dataset(tmp_path, verify="exists")
    assert ds.label_map == {"1": 0} and len(ds) == 2
    assert set(ds.failures) == {str(image_path(tmp_path, g)) for g in gone}
    assert "2 unreadable or missing" in caplog.text and "no readable image at all" in caplog.text
    assert ": 2" in caplog.text.split("no readable image at all")[1].splitlines()[0]


def _epoch(loader) -> list[int]:
    return [int(y) for _, labels in loader for y in labels]


def test_failures_counted_over_two_workers_and_reported_once_per_epoch(tmp_path, caplog):
    classes = {"1": _ids("1", 4), "2": _ids("2", 4), "3": _ids("3", 2), "4": _ids("4", 4)}
    broken = {classes["1"][0], classes["2"][1]}
    dead = set(classes["3"])  # every image of landmark 3 is unreadable
    _write(tmp_path, classes, broken=broken | {classes["3"][0]}, missing={classes["3"][1]})
    dm = RetrievalDataModule(root=str(tmp_path), train_size=16, batch_size=2, num_workers=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    with caplog.at_level(logging.WARNING, logger="dalg.data"):
        labels = _epoch(loader)
    reports = [r for r in caplog.records if "unreadable or missing" in r.getMessage()]
    assert len(reports) == 1, caplog.text  # one summary for the epoch, from the main process
    text = reports[0].getMessage()
    assert "4 unreadable or missing image(s)" in text and "class(es) have no readable image at all" in text
    assert text.rstrip().endswith(": 3")  # the emptied class, by its landmark id
    assert set(dm.train_set.failures) == {str(image_path(tmp_path, i)) for i in broken | dead}
    assert 2 not in labels and len(labels) == 14  # label 2 = landmark 3: its slots took other classes' images

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dalg.data"):
        _epoch(loader)  # persistent workers, nothing new
    assert "unreadable" not in caplog.text


class _TinyClassifier(pl.LightningModule):
    def __init__(self, num_classes: int):
        super().__init__()
        self.fc = torch.nn.Linear(3, num_classes)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.fc(x.mean((2, 3))), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_reports_at_the_end_of_the_epoch_where_damage_is_found(tmp_path, caplog):
    classes = {"1": _ids("1", 3), "2": _ids("2", 3)}
    _write(tmp_path, classes, broken={classes["2"][0]})
    dm = RetrievalDataModule(root=str(tmp_path), train_size=16, batch_size=2, num_workers=0)
    dm.setup("fit")
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    with caplog.at_level(logging.WARNING, logger="dalg.data"):
        trainer.fit(_TinyClassifier(dm.num_classes), datamodule=dm)
    reports = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(reports) == 1 and "1 unreadable or missing image(s)" in reports[0]


def test_sample_table_is_compact_and_list_like():
    from dalg.data.labelled import SampleTable

    pairs = [(f"{i:016x}", i % 7) for i in range(10_000)]
    table = SampleTable.build(pairs)
    assert table == pairs and table[3] == pairs[3] and len(table) == 10_000
    assert table.keys.nbytes + table.labels.nbytes == 10_000 * (16 + 4)  # no per-sample Python objects
    assert list(table.take([5, 2])) == [pairs[5], pairs[2]] and table != pairs[:-1]


def test_empty_class_in_a_split_is_substituted_from_a_class_present_there(tmp_path):
    classes = {"1": _ids("1", 1), "2": _ids("2", 2), "3": _ids("3", 2)}
    _write(tmp_path, classes, broken=set(classes["2"]))
    full = GLDv2Dataset(tmp_path)
    full.substitute_empty_classes = True
    _, val = full.split(0.5)  # landmark 1 has no val image; landmark 2's val image is broken
    labels = [val[i][1] for i in range(len(val))]
    assert labels == [2, 2] and "2" in val.empty_classes


def test_train_loader_survives_lightning_sampler_injection(tmp_path, caplog):
    """Under DDP Lightning rebuilds the train DataLoader with a DistributedSampler; the rebuilt loader must keep
    reporting unreadable images."""
    from lightning_fabric.utilities.data import _replace_dunder_methods
    from pytorch_lightning.trainer.states import RunningStage
    from pytorch_lightning.utilities.data import _update_dataloader
    from torch.utils.data import DataLoader, DistributedSampler

    classes = {"1": _ids("1", 3), "2": _ids("2", 3)}
    _write(tmp_path, classes, broken={classes["1"][1]})
    dm = RetrievalDataModule(root=str(tmp_path), train_size=16, batch_size=1, num_workers=0)
    dm.setup("fit")
    with _replace_dunder_methods(DataLoader, "dataset"):
        loader = dm.train_dataloader()
    rebuilt = _update_dataloader(
        loader, DistributedSampler(dm.train_set, num_replicas=1, rank=0), mode=RunningStage.TRAINING
    )
    assert type(rebuilt) is type(loader) and isinstance(rebuilt.sampler, DistributedSampler)
    with caplog.at_level(logging.WARNING, logger="dalg.data"):
        assert len(_epoch(rebuilt)) == 6
    assert "1 unreadable or missing image(s)" in caplog.text


def test_report_per_epoch_through_the_training_pipeline_loader(tmp_path, caplog):
    """train_pipeline re-wraps the loader in a ResumableLoader (a new DataLoader): damage found in epoch 0 is still
    reported once, before epoch 1 trains, and new damage in a later epoch gets its own report."""
    from dalg.train_pipeline import make_train_loader_resumable

    classes = {"1": _ids("1", 3), "2": _ids("2", 3)}
    _write(tmp_path, classes, broken={classes["2"][0]})
    dm = RetrievalDataModule(root=str(tmp_path), train_size=16, batch_size=2, num_workers=0)
    dm.setup("fit")
    trainer_ref: list = []
    make_train_loader_resumable(dm, trainer_ref, seed=0)

    class _BreakOnSecondEpoch(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:  # damage that appears later is reported when found
                image_path(tmp_path, classes["1"][2]).write_bytes(b"")

    trainer = pl.Trainer(
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[_BreakOnSecondEpoch()],
    )
    trainer_ref.append(trainer)
    with caplog.at_level(logging.WARNING, logger="dalg.data"):
        trainer.fit(_TinyClassifier(dm.num_classes), datamodule=dm)
    reports = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(reports) == 2, reports
    assert str(image_path(tmp_path, classes["2"][0])) in reports[0]
    assert str(image_path(tmp_path, classes["1"][2])) in reports[1] and "(2 of 6 listed so far)" in reports[1]
