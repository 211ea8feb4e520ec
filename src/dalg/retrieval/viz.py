"""Result grids: a query and its top-k database images, bordered by their label in a setup of the protocol."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from dalg.data.revisited import RevisitedImages
from dalg.retrieval.metrics import SETUP_LISTS

COLOURS = {
    "positive": (30, 170, 60),
    "negative": (210, 40, 40),
    "junk": (150, 150, 150),
    "query": (40, 90, 220),
}


def setup_labels(gnd: Mapping, setup: str) -> tuple[set[int], set[int]]:
    """(positives, ignored) database indices of one query in setup E, M or H (metrics.SETUP_LISTS)."""
    if setup not in SETUP_LISTS:
        raise ValueError(f"setup must be one of {', '.join(SETUP_LISTS)}, got {setup!r}")
    positives, ignored = SETUP_LISTS[setup]
    return {i for k in positives for i in gnd[k]}, {i for k in ignored for i in gnd[k]}


def _tile(img: Image.Image, size: int, colour: tuple[int, int, int], border: int) -> Image.Image:
    thumb = ImageOps.pad(img, (size - 2 * border, size - 2 * border), color=(255, 255, 255))
    return ImageOps.expand(thumb, border=border, fill=colour)


def result_grid(
    images: RevisitedImages,
    ranks: np.ndarray,
    queries: Sequence[int],
    top_k: int = 10,
    setup: str = "M",
    thumb: int = 96,
    border: int = 5,
) -> Image.Image:
    """One row per query: the (cropped) query in blue, then its top-k results in green / red / grey."""
    gt = images.gt
    canvas = Image.new("RGB", ((top_k + 1) * thumb, len(queries) * thumb), "white")
    draw = ImageDraw.Draw(canvas)
    for row, q in enumerate(queries):
        canvas.paste(_tile(images.load(q), thumb, COLOURS["query"], border), (0, row * thumb))
        positives, junk = setup_labels(gt.gnd[q], setup)
        for col, db in enumerate(ranks[q, :top_k]):
            db = int(db)
            kind = "positive" if db in positives else "junk" if db in junk else "negative"
            tile = _tile(images.load(gt.n_queries + db), thumb, COLOURS[kind], border)
            canvas.paste(tile, ((col + 1) * thumb, row * thumb))
        draw.text((3, row * thumb + 2), gt.qimlist[q][:14], fill=(255, 255, 255))
    return canvas
