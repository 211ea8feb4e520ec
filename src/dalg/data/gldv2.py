"""Google Landmarks v2 in its official layout (protocol.md): ``train_clean.csv`` / ``train.csv`` + ``train/a/b/c/<id>.jpg``.

Classes are relabelled 0..N-1 in sorted order of the original landmark ids; the map is kept on the dataset
(``label_map``) and written beside checkpoints by the DataModule. Real downloads are incomplete: a listed file
that is missing or unreadable is counted, reported once with a few example paths, and replaced by another image
of the same class, so an epoch never crashes and no class silently disappears.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from dalg.data.images import ImageReadError, load_rgb

log = logging.getLogger(__name__)


def image_path(root: str | os.PathLike, image_id: str) -> Path:
    return Path(root) / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def read_gldv2_csv(csv_path: str | os.PathLike) -> dict[str, list[str]]:
    """``{landmark_id: [image ids]}`` from ``train_clean.csv`` (landmark_id,images) or ``train.csv`` (id,url,landmark_id)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"GLDv2 list {csv_path} does not exist (expected train_clean.csv or train.csv)")
    groups: dict[str, list[str]] = {}
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or [])
        if {"landmark_id", "images"} <= fields:
            for row in reader:
                groups.setdefault(row["landmark_id"], []).extend(row["images"].split())
        elif {"id", "landmark_id"} <= fields:
            for row in reader:
                groups.setdefault(row["landmark_id"], []).append(row["id"])
        else:
            raise ValueError(f"{csv_path}: unknown columns {sorted(fields)}; expected landmark_id,images or id,url,landmark_id")
    return groups


def _sort_key(landmark_id: str) -> tuple[int, int | str]:
    # GLDv2 ids are integers: sort numerically ("10" after "9"), fall back to text for other datasets
    return (0, int(landmark_id)) if landmark_id.isdigit() else (1, landmark_id)


class GLDv2Dataset(Dataset):
    """``(image, label)`` pairs; labels are 0..num_classes-1 in sorted landmark-id order."""

    def __init__(self, root: str | os.PathLike, csv_name: str = "train_clean.csv", transform: Callable | None = None,
                 min_images_per_class: int = 1):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"GLDv2 root {self.root} does not exist")
        groups = read_gldv2_csv(self.root / csv_name)
        kept = sorted((k for k, v in groups.items() if len(v) >= min_images_per_class), key=_sort_key)
        if not kept:
            raise ValueError(f"{self.root / csv_name}: no class has at least {min_images_per_class} images")
        self.label_map: dict[str, int] = {lid: i for i, lid in enumerate(kept)}
        self.samples: list[tuple[str, int]] = [(iid, self.label_map[lid]) for lid in kept for iid in groups[lid]]
        self.class_index: list[list[int]] = [[] for _ in kept]
        for i, (_, label) in enumerate(self.samples):
            self.class_index[label].append(i)
        self.transform = transform
        self.failures: dict[str, str] = {}  # per process (each DataLoader worker keeps its own)

    @property
    def num_classes(self) -> int:
        return len(self.label_map)

    def __len__(self) -> int:
        return len(self.samples)

    def path(self, index: int) -> Path:
        return image_path(self.root, self.samples[index][0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = self.samples[index][1]
        # try the image, then the other images of its class: a broken file costs one substitution, not the epoch
        siblings = self.class_index[label]
        start = siblings.index(index)
        for k in range(len(siblings)):
            candidate = siblings[(start + k) % len(siblings)]
            try:
                img = load_rgb(self.path(candidate))
                break
            except ImageReadError as e:
                self._report(e)
        else:
            raise ImageReadError(self.path(index), f"no readable image left in class {label} "
                                 f"(landmark {self._landmark(label)})")
        return (self.transform(img) if self.transform else img), label

    def _landmark(self, label: int) -> str:
        return next(k for k, v in self.label_map.items() if v == label)

    def _report(self, error: ImageReadError) -> None:
        if error.path not in self.failures:
            self.failures[error.path] = error.reason
            if len(self.failures) <= 5:
                log.warning("%s (replaced by another image of its class; %d unreadable so far in this process)",
                            error, len(self.failures))
