"""A search's result grid as one PNG: a row per query, the query (blue) then its results with scores."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from dalg.data.images import ImageReadError, load_rgb

QUERY = (40, 90, 220)
RESULT = (120, 120, 120)
MISSING = (235, 235, 235)


def _tile(path: str | None, size: int, colour: tuple[int, int, int], border: int) -> Image.Image:
    inner = size - 2 * border
    try:
        img = load_rgb(path, need_side=inner) if path else None
    except ImageReadError:
        img = None
    if img is None:  # the store's image is not where the search looked: a grey tile, the name still printed
        thumb = Image.new("RGB", (inner, inner), MISSING)
    else:
        thumb = ImageOps.pad(img, (inner, inner), color=(255, 255, 255))
    return ImageOps.expand(thumb, border=border, fill=colour)


def search_grid(
    query_paths: Sequence[str],
    ranks: np.ndarray,
    scores: np.ndarray,
    database_paths: Sequence[str],
    thumb: int = 128,
    border: int = 4,
    label: int = 14,
) -> Image.Image:
    """Row ``q``: query ``q``, then ``database_paths[ranks[q, j]]`` with ``#rank score`` under each tile."""
    ranks, scores = np.asarray(ranks), np.asarray(scores)
    n_q, k = ranks.shape
    row_h = thumb + label
    canvas = Image.new("RGB", ((k + 1) * thumb, n_q * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    for q in range(n_q):
        y = q * row_h
        canvas.paste(_tile(query_paths[q], thumb, QUERY, border), (0, y))
        draw.text((3, y + thumb), str(query_paths[q]).rsplit("/", 1)[-1][:20], fill=QUERY)
        for j in range(k):
            db = int(ranks[q, j])
            path = database_paths[db] if 0 <= db < len(database_paths) else None
            canvas.paste(_tile(path, thumb, RESULT, border), ((j + 1) * thumb, y))
            draw.text(((j + 1) * thumb + 3, y + thumb), f"#{j + 1} {scores[q, j]:.3f}", fill=(0, 0, 0))
    return canvas
