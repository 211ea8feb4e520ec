"""The model's attention maps over a query, as coloured overlays for the report.

The report takes any ``AttentionFn`` (PIL image -> ``{"image": uint8 HxWx3, <title>: float map in [0, 1]}``,
the format of the code base's attention-map function); :func:`model_attention` binds it to a network.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from PIL import Image

AttentionFn = Callable[[Image.Image], Mapping[str, np.ndarray]]


def model_attention(net: object, size: int) -> AttentionFn:
    """Attention maps of ``net`` (a DALG/DOLG network) over an image resized to the longer side ``size``."""
    from dalg.tools.attention_maps import attention_maps  # the only place the report touches the model code

    return lambda image: attention_maps(net, image, size)


def overlays(maps: Mapping[str, np.ndarray], alpha: float = 0.5) -> list[tuple[str, Image.Image]]:
    """The image, then one jet-coloured blend per attention map (the colour scale of visualize_attention)."""
    from matplotlib import colormaps

    if "image" not in maps:
        raise ValueError(f"attention maps need the displayed 'image'; got {sorted(maps)}")
    base = np.asarray(maps["image"], dtype=np.float32)
    out = [("image", Image.fromarray(base.astype(np.uint8)))]
    for title, m in maps.items():
        if title == "image":
            continue
        m = np.asarray(m, dtype=np.float32)
        if m.shape != base.shape[:2]:
            raise ValueError(f"attention map {title!r} is {m.shape}, the image {base.shape[:2]}")
        colour = colormaps["jet"](np.clip(m, 0.0, 1.0))[..., :3] * 255.0
        blend = (1.0 - alpha) * base + alpha * colour
        out.append((title, Image.fromarray(np.clip(blend, 0, 255).astype(np.uint8))))
    return out
