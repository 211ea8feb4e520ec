"""Google Landmarks v2 in its official layout (protocol.md): ``train_clean.csv`` / ``train.csv`` + ``train/a/b/c/<id>.jpg``.

Classes are relabelled 0..N-1 in sorted (numeric) order of the landmark ids; the map is kept on the dataset
(``label_map``) and written beside checkpoints by the DataModule. Real downloads are incomplete: a listed file
that is missing or unreadable is counted, reported once with a few example paths, and replaced by another image
of the same class, so an epoch never crashes and no class silently disappears (see ``labelled.py``).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path

from dalg.data.labelled import LabelledImages, class_sort_key


def image_path(root: str | os.PathLike, image_id: str) -> Path:
    return Path(root) / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def read_gldv2_csv(csv_path: str | os.PathLike) -> dict[str, list[str]]:
    """``{landmark_id: [image ids]}`` from ``train_clean.csv`` (landmark_id,images) or ``train.csv`` (id,url,landmark_id).

    An id listed twice for the same landmark is kept once (the image would otherwise be seen twice per epoch).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"GLDv2 list {csv_path} does not exist (expected train_clean.csv or train.csv)"
        )
    groups: dict[str, list[str]] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = {name.strip() for name in (reader.fieldnames or [])}
        reader.fieldnames = [name.strip() for name in (reader.fieldnames or [])]
        if {"landmark_id", "images"} <= fields:
            for row in reader:
                if row["landmark_id"] is None or not row["landmark_id"].strip():
                    raise ValueError(f"{csv_path}, line {reader.line_num}: empty landmark_id")
                groups.setdefault(row["landmark_id"].strip(), []).extend((row["images"] or "").split())
        elif {"id", "landmark_id"} <= fields:
            for row in reader:
                if not (row["id"] or "").strip() or not (row["landmark_id"] or "").strip():
                    raise ValueError(f"{csv_path}, line {reader.line_num}: empty id or landmark_id")
                groups.setdefault(row["landmark_id"].strip(), []).append(row["id"].strip())
        else:
            raise ValueError(
                f"{csv_path}: unknown columns {sorted(fields)}; expected landmark_id,images or id,url,landmark_id"
            )
    groups = {lid: list(dict.fromkeys(ids)) for lid, ids in groups.items() if ids}
    if not groups:
        raise ValueError(f"{csv_path}: lists no image")
    return groups


# kept for code that imported the old private name
_sort_key = class_sort_key


class GLDv2Dataset(LabelledImages):
    """``(image, label)`` pairs; labels are 0..num_classes-1 in sorted landmark-id order.

    ``verify`` (``none`` | ``exists`` | ``header``) pre-scans the listed files before training; see
    :class:`~dalg.data.labelled.LabelledImages`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        csv_name: str = "train_clean.csv",
        transform: Callable | None = None,
        min_images_per_class: int = 1,
        verify: str = "none",
    ):
        self.root = Path(os.path.expanduser(str(root)))
        if not self.root.is_dir():
            raise FileNotFoundError(f"GLDv2 root {self.root} does not exist")
        groups = read_gldv2_csv(self.root / csv_name)
        super().__init__(groups, transform, min_images_per_class, verify, source=str(self.root / csv_name))

    def path_of(self, key: str) -> Path:
        return image_path(self.root, key)

    def _landmark(self, label: int) -> str:
        return self.class_names[label]
