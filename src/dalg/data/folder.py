"""A user's own photos, without code.

Training: a folder of class subfolders (``<root>/<class>/**/<image>``), read by :class:`ImageFolderDataset`
with the same relabelling and damage handling as GLDv2.

Evaluation: a folder of images plus a small CSV of queries (:func:`load_query_csv`), converted to the same
:class:`~dalg.data.revisited.RevisitedGroundTruth` the Revisited sets use, so the callback and ``eval.py`` score
it with the official protocol::

    query,positives,junk,bbx
    tower_q1.jpg,tower_a.jpg tower_b.jpg,tower_far.jpg,10 20 300 400
    bridge_q.jpg,bridge_1.jpg;bridge at night.jpg,,

Columns ``query`` and ``positives`` are required; ``hard`` (hard positives), ``junk`` (ignored in the ranking)
and ``bbx`` (``x1 y1 x2 y2`` in the query's pixels) are optional. A list separates names by spaces, or by ``;``
when a name contains a space. Names are paths relative to the image folder; the extension may be left out when
it is unambiguous. The database is every image of the folder that is not a query. ``positives`` become the
protocol's ``easy`` list, so Easy = Medium when no ``hard`` column is given, and Hard has no positives (NaN).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dalg.data.eval_spec import EvalSetSpec, spec_path
from dalg.data.labelled import LabelledImages
from dalg.data.revisited import RevisitedGroundTruth

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def list_images(directory: str | os.PathLike, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Relative POSIX paths of the image files under ``directory`` (recursive, sorted, hidden entries skipped)."""
    directory = Path(directory)
    exts = {e.lower() for e in extensions}
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in exts:
                found.append((Path(dirpath) / name).relative_to(directory).as_posix())
    return sorted(found)


class ImageFolderDataset(LabelledImages):
    """``<root>/<class name>/**/<image>``: one class per subfolder, labels in sorted class-name order."""

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        min_images_per_class: int = 1,
        verify: str = "none",
        extensions: Iterable[str] = IMAGE_EXTENSIONS,
    ):
        self.root = Path(os.path.expanduser(str(root)))
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.root} does not exist (expected <root>/<class>/<image>)"
            )
        groups: dict[str, list[str]] = {}
        for sub in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            images = list_images(sub, extensions)
            if images:
                groups[sub.name] = [f"{sub.name}/{rel}" for rel in images]
            else:
                log.warning(
                    "%s: class folder %s holds no image (%s) and is left out",
                    self.root,
                    sub.name,
                    ", ".join(sorted(set(extensions))),
                )
        loose = [p.name for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in set(extensions)]
        if loose:
            log.warning(
                "%s: %d image(s) directly in the root are ignored (put them in a class subfolder), e.g. %s",
                self.root,
                len(loose),
                loose[:3],
            )
        if not groups:
            raise ValueError(
                f"image folder {self.root} has no class subfolder with images "
                f"(expected <root>/<class>/<image>)"
            )
        super().__init__(groups, transform, min_images_per_class, verify, source=str(self.root))

    def path_of(self, key: str) -> Path:
        return self.root / key


# ------------------------------------------------------------------------------------------ queries CSV
def _split_names(field: str | None) -> list[str]:
    field = (field or "").strip()
    if not field:
        return []
    parts = field.split(";") if ";" in field else field.split()
    return [p.strip() for p in parts if p.strip()]


class _NameResolver:
    """Maps a name from the CSV to a file of the folder: exact relative path, else unique path without extension."""

    def __init__(self, files: list[str], csv_path: Path):
        self.files = set(files)
        self.csv_path = csv_path
        self.by_stem: dict[str, list[str]] = {}
        for f in files:
            self.by_stem.setdefault(os.path.splitext(f)[0], []).append(f)

    def __call__(self, name: str, line: int) -> str:
        name = name.replace("\\", "/")
        name = name[2:] if name.startswith("./") else name
        if name in self.files:
            return name
        matches = self.by_stem.get(name, [])
        if len(matches) == 1:
            return matches[0]
        what = f"is ambiguous ({', '.join(matches)})" if matches else "is not an image in the folder"
        raise ValueError(f"{self.csv_path}, line {line}: {name!r} {what}")


def _parse_bbx(field: str | None, csv_path: Path, line: int) -> list[float] | None:
    values = (field or "").replace(",", " ").split()
    if not values:
        return None
    try:
        box = [float(v) for v in values]
    except ValueError:
        box = []
    if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(
            f"{csv_path}, line {line}: bbx must be 'x1 y1 x2 y2' with x2 > x1 and y2 > y1, got {field!r}"
        )
    return box


def load_query_csv(
    images: str | os.PathLike,
    queries_csv: str | os.PathLike,
    name: str = "custom",
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> RevisitedGroundTruth:
    """A folder of images + a queries CSV -> the Revisited ground-truth structure (0-based database indices)."""
    image_dir = Path(os.path.expanduser(str(images)))
    csv_path = Path(os.path.expanduser(str(queries_csv)))
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} does not exist")
    if not csv_path.is_file():
        raise FileNotFoundError(f"queries CSV {csv_path} does not exist")
    files = list_images(image_dir, extensions)
    resolve = _NameResolver(files, csv_path)
    rows = []
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        reader.fieldnames = [c.strip().lower() for c in (reader.fieldnames or [])]
        missing = {"query", "positives"} - set(reader.fieldnames)
        if missing:
            raise ValueError(
                f"{csv_path}: missing column(s) {sorted(missing)}; columns are "
                f"query,positives[,hard][,junk][,bbx], got {reader.fieldnames}"
            )
        unknown = set(reader.fieldnames) - {"query", "positives", "hard", "junk", "bbx"}
        if unknown:
            raise ValueError(
                f"{csv_path}: unknown column(s) {sorted(unknown)}; allowed: query,positives,hard,junk,bbx"
            )
        for row in reader:
            line = reader.line_num
            if not (row.get("query") or "").strip():
                if any((v or "").strip() for v in row.values() if isinstance(v, str)):
                    raise ValueError(f"{csv_path}, line {line}: empty query")
                continue  # a blank line
            query = resolve(row["query"].strip(), line)
            lists = {
                key: [resolve(n, line) for n in _split_names(row.get(key))]
                for key in ("positives", "hard", "junk")
            }
            rows.append((line, query, lists, _parse_bbx(row.get("bbx"), csv_path, line)))
    if not rows:
        raise ValueError(f"{csv_path}: no query rows")

    queries = [q for _, q, _, _ in rows]
    duplicated = sorted({q for q in queries if queries.count(q) > 1})
    if duplicated:
        raise ValueError(f"{csv_path}: queries listed more than once: {duplicated[:5]}")
    query_set = set(queries)
    database = [f for f in files if f not in query_set]
    index = {f: i for i, f in enumerate(database)}
    gnd = []
    for line, query, lists, bbx in rows:
        entry = {"bbx": bbx}
        for key, out in (("positives", "easy"), ("hard", "hard"), ("junk", "junk")):
            bad = [n for n in lists[key] if n not in index]
            if bad:
                raise ValueError(f"{csv_path}, line {line}: {key} {bad[:3]} are queries, not database images")
            entry[out] = sorted({index[n] for n in lists[key]})
        overlap = set(entry["easy"] + entry["hard"]) & set(entry["junk"])
        if overlap:
            raise ValueError(
                f"{csv_path}, line {line}: {[database[i] for i in sorted(overlap)][:3]} are listed as "
                f"both positive and junk"
            )
        if not entry["easy"] and not entry["hard"]:
            log.warning(
                "%s, line %d: query %s has no positive; it is skipped by every setup", csv_path, line, query
            )
        gnd.append(entry)
    return RevisitedGroundTruth(name, image_dir, database, queries, gnd, suffix="", source=csv_path)


@dataclass(frozen=True, kw_only=True)
class QueryCsvSet(EvalSetSpec):
    """An evaluation set of your own photos: every image under ``images`` is the database except the queries
    listed in ``queries_csv`` (:func:`load_query_csv`)."""

    images: str
    queries_csv: str

    def definition_files(self) -> dict[str, Path]:
        return {"queries_csv": spec_path(self.queries_csv)}

    def missing(self) -> str | None:
        absent = next(
            (p for p in (spec_path(self.images), spec_path(self.queries_csv)) if not p.exists()), None
        )
        return None if absent is None else f"{absent} not found"

    def load(self) -> RevisitedGroundTruth:
        return load_query_csv(self.images, self.queries_csv, self.name or "custom")
