"""Revisited Oxford / Paris layout (protocol.md): ``<data_dir>/gnd_<name>.pkl`` + ``<data_dir>/jpg/<image>.jpg``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dalg.data.eval_spec import EvalSetSpec, spec_path
from dalg.data.image_list import ImageList
from dalg.data.images import ImageReadError, image_size
from dalg.utils.safe_pickle import load_plain_pickle

log = logging.getLogger(__name__)


@dataclass
class RevisitedGroundTruth:
    name: str
    image_dir: Path
    imlist: list[str]  # database names (no extension)
    qimlist: list[str]  # query names
    gnd: list[dict]  # per query: bbx, easy, hard, junk (0-based indices into imlist)
    suffix: str = ".jpg"  # appended to the names (the Revisited sets list names without extension)
    source: Path | None = None  # the gnd pickle or queries CSV it came from, for messages

    @property
    def n_queries(self) -> int:
        return len(self.qimlist)

    @property
    def n_database(self) -> int:
        return len(self.imlist)

    def query_path(self, i: int) -> Path:
        return self.image_dir / f"{self.qimlist[i]}{self.suffix}"

    def database_path(self, i: int) -> Path:
        return self.image_dir / f"{self.imlist[i]}{self.suffix}"


def find_ground_truth(data_dir: str | os.PathLike, name: str) -> Path | None:
    """``<data_dir>/gnd_<name>.pkl``, or ``<data_dir>/<name>/gnd_<name>.pkl`` (data_dir = the datasets' parent)."""
    data_dir = Path(os.path.expanduser(str(data_dir)))
    for candidate in (data_dir / f"gnd_{name}.pkl", data_dir / name / f"gnd_{name}.pkl"):
        if candidate.is_file():
            return candidate
    return None


def _check_bbx(pkl: Path, qi: int, query: str, bbx) -> list[float] | None:
    if bbx is None:
        return None
    try:
        box = [float(v) for v in bbx]
    except (TypeError, ValueError):
        box = []
    if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(
            f"{pkl}: query {qi} ({query}) has bbx {bbx!r}; expected [x1, y1, x2, y2] with x2 > x1, y2 > y1"
        )
    return box


def load_ground_truth(data_dir: str | os.PathLike, name: str) -> RevisitedGroundTruth:
    pkl = find_ground_truth(data_dir, name)
    if pkl is None:
        raise FileNotFoundError(
            f"ground truth {Path(data_dir) / f'gnd_{name}.pkl'} does not exist "
            f"(Revisited layout: <data_dir>/gnd_<name>.pkl + <data_dir>/jpg/)"
        )
    data_dir = pkl.parent
    raw = load_plain_pickle(pkl, "ground-truth file")  # restricted: a downloaded gnd file runs no code
    if not isinstance(raw, dict):
        raise ValueError(f"{pkl}: expected a dict with imlist, qimlist and gnd, got {type(raw).__name__}")
    missing = {"imlist", "qimlist", "gnd"} - set(raw)
    if missing:
        raise ValueError(f"{pkl}: missing keys {sorted(missing)}")
    if len(raw["gnd"]) != len(raw["qimlist"]):
        raise ValueError(f"{pkl}: {len(raw['gnd'])} gnd entries for {len(raw['qimlist'])} queries")
    n = len(raw["imlist"])
    for qi, g in enumerate(raw["gnd"]):
        if not isinstance(g, dict):
            raise ValueError(
                f"{pkl}: gnd entry {qi} is a {type(g).__name__}, expected a dict with bbx/easy/hard/junk"
            )
        for key in ("easy", "hard", "junk"):
            bad = [j for j in g.get(key, []) if not 0 <= j < n]
            if bad:
                raise ValueError(
                    f"{pkl}: query {qi} ({raw['qimlist'][qi]}) has {key} indices outside "
                    f"0..{n - 1}: {bad[:5]} (is it the 1-based .mat version?)"
                )
    # int()/str(): the official files may hold NumPy arrays and scalars
    gnd = [
        {
            "bbx": _check_bbx(pkl, qi, raw["qimlist"][qi], g.get("bbx")),
            **{key: [int(j) for j in g.get(key, [])] for key in ("easy", "hard", "junk")},
        }
        for qi, g in enumerate(raw["gnd"])
    ]
    return RevisitedGroundTruth(
        name,
        data_dir / "jpg",
        [str(n) for n in raw["imlist"]],
        [str(n) for n in raw["qimlist"]],
        gnd,
        source=pkl,
    )


@dataclass(frozen=True, kw_only=True)
class RevisitedSet(EvalSetSpec):
    """An evaluation set in the Revisited layout: ``<data_dir>/gnd_<gnd_name>.pkl`` + ``<data_dir>/jpg/`` (or
    ``<data_dir>/<gnd_name>/...``, data_dir being the datasets' parent)."""

    data_dir: str
    gnd_name: str

    def definition_files(self) -> dict[str, Path]:
        found = find_ground_truth(self.data_dir, self.gnd_name)
        return {"gnd": found or spec_path(self.data_dir) / f"gnd_{self.gnd_name}.pkl"}

    def load(self) -> RevisitedGroundTruth:
        return load_ground_truth(self.data_dir, self.gnd_name)


class RevisitedImages(ImageList):
    """Queries followed by database images; item = ``(image, index)`` with index into that combined order.

    Queries are cropped to their ``bbx`` before any resizing (the official protocol) unless ``crop_queries``
    is false (the variant many papers report; never mixed silently: the flag is logged with the results).
    """

    def __init__(
        self, gt: RevisitedGroundTruth, transform: Callable | None = None, crop_queries: bool = True
    ):
        paths = [gt.query_path(i) for i in range(gt.n_queries)]
        super().__init__(paths + [gt.database_path(i) for i in range(gt.n_database)], transform)
        self.gt = gt
        self.crop_queries = crop_queries
        self.boxes: Sequence[Sequence[float] | None] = [g["bbx"] if crop_queries else None for g in gt.gnd]
        if crop_queries:  # at setup, not mid-extraction: the query files exist and their boxes hit the image
            self.boxes = [None if box is None else self._fit_box(i, box) for i, box in enumerate(self.boxes)]

    def _fit_box(self, qi: int, box: Sequence[float]) -> list[float]:
        """``box`` clipped to the query image (read from its header); a box without a pixel inside it is an error."""
        where = f"{self.gt.source or self.gt.name}: query {qi} ({self.gt.qimlist[qi]}, {self.paths[qi]})"
        try:
            width, height = image_size(self.paths[qi])
        except ImageReadError as e:
            raise ImageReadError(
                e.path, f"{where} has a bbx but its image cannot be read: {e.reason}", e.kind
            ) from e
        x0, y0, x1, y1 = (float(v) for v in box)
        clipped = [max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))]
        if round(clipped[2]) <= round(clipped[0]) or round(clipped[3]) <= round(clipped[1]):
            raise ValueError(
                f"{where}: bbx {[x0, y0, x1, y1]} lies outside the {width}x{height} image "
                f"(no pixel of it is inside); fix the box"
            )
        if clipped != [x0, y0, x1, y1]:
            log.warning(
                "%s: bbx %s extends past the %dx%d image; clipped to %s",
                where,
                [x0, y0, x1, y1],
                width,
                height,
                clipped,
            )
        return clipped

    def crop_box(self, index: int) -> tuple[int, int, int, int] | None:
        """The query's bbx rounded as PIL's ``crop`` rounds it; None for database images or with cropping off."""
        if index >= self.gt.n_queries or self.boxes[index] is None:
            return None
        x0, y0, x1, y1 = (round(float(v)) for v in self.boxes[index])
        return x0, y0, x1, y1
