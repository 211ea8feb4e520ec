"""The embedded default dataset: synthetic "landmarks" rendered under changes of view, light and clutter.

Each class is a distinct scene (a layout of coloured, textured shapes on a two-tone background) drawn once
in a canonical frame; every image of the class is a new *view* of it: a random perspective warp (viewpoint),
zoom and crop (scale), a shift of brightness / contrast / colour (light), occluding shapes (clutter),
blur and sensor noise. Nothing but the scene identity is shared between images of a class, so the task is
instance retrieval, not colour matching or noise memorisation.

The training part is written in the GLDv2 layout (protocol.md) so the default run goes through the same
loader as real GLDv2; a held-out part (classes never used for training) is written in the Revisited layout
(``gnd_<name>.pkl`` + ``jpg/``) with easy / hard / junk labels derived from how strong each view's change is.
Everything is a pure function of ``seed`` and the size arguments: the same call writes the same files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when rendering changes, so stale caches are regenerated
CANVAS = 256  # side of the canonical scene, in pixels


# a set small enough for seconds-long runs (tests, the GPU check's DDP run), same generator as the default
TINY_SYNTHETIC = dict(
    seed=0,
    train_classes=12,
    images_per_class=4,
    heldout_classes=5,
    heldout_db_per_class=4,
    heldout_distractors=4,
    image_size=64,
)


@dataclass(frozen=True)
class SyntheticSpec:
    seed: int = 0
    train_classes: int = 300
    images_per_class: int = 12
    heldout_classes: int = 40
    heldout_db_per_class: int = 6
    heldout_distractors: int = 60
    image_size: int = 128  # longer side of every written image

    def fingerprint(self) -> str:
        blob = json.dumps({**asdict(self), "format": FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------- scenes
def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    # saturated colours from HSV, so that scenes differ in hue and not only in brightness
    h, s, v = rng.random(), rng.uniform(0.45, 1.0), rng.uniform(0.35, 1.0)
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return int(r * 255), int(g * 255), int(b * 255)


def _draw_shape(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, box: tuple[float, float, float, float]
) -> None:
    """One textured shape inside ``box``: polygon, ellipse, striped block or a 'window grid' facade."""
    x0, y0, x1, y1 = box
    colour, accent = _random_colour(rng), _random_colour(rng)
    kind = rng.integers(0, 5)
    if kind == 0:
        draw.ellipse(box, fill=colour, outline=accent, width=int(rng.integers(2, 6)))
    elif kind == 1:
        n = int(rng.integers(3, 7))
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        draw.polygon([(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles], fill=colour)
    elif kind == 2:  # stripes
        draw.rectangle(box, fill=colour)
        step = max(3, int(rng.integers(4, 12)))
        vertical = rng.random() < 0.5
        for k in range(0, int((x1 - x0) if vertical else (y1 - y0)), 2 * step):
            if vertical:
                draw.rectangle((x0 + k, y0, min(x1, x0 + k + step), y1), fill=accent)
            else:
                draw.rectangle((x0, y0 + k, x1, min(y1, y0 + k + step)), fill=accent)
    elif kind == 3:  # facade: a block with a grid of windows (the most "landmark-like" texture)
        draw.rectangle(box, fill=colour)
        rows, cols = int(rng.integers(2, 5)), int(rng.integers(2, 5))
        w, h = (x1 - x0) / cols, (y1 - y0) / rows
        for r in range(rows):
            for c in range(cols):
                draw.rectangle(
                    (
                        x0 + c * w + w * 0.25,
                        y0 + r * h + h * 0.25,
                        x0 + c * w + w * 0.75,
                        y0 + r * h + h * 0.75,
                    ),
                    fill=accent,
                )
    else:  # roof / gable: triangle on a block
        mid = (y0 + y1) / 2
        draw.rectangle((x0, mid, x1, y1), fill=colour)
        draw.polygon([(x0, mid), ((x0 + x1) / 2, y0), (x1, mid)], fill=accent)


def render_scene(rng: np.random.Generator) -> Image.Image:
    """The canonical view of one scene."""
    top, bottom = np.array(_random_colour(rng), float), np.array(_random_colour(rng), float)
    t = np.linspace(0, 1, CANVAS)[:, None, None]
    horizon = rng.uniform(0.45, 0.8)
    sky = top * (1 - t) + bottom * t
    ground = np.array(_random_colour(rng), float) * 0.6
    img = np.where(t < horizon, sky, ground).repeat(CANVAS, axis=1).astype(np.uint8)
    canvas = Image.fromarray(img, "RGB")
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(5, 10))):
        w, h = rng.uniform(0.15, 0.5) * CANVAS, rng.uniform(0.15, 0.6) * CANVAS
        x0, y0 = rng.uniform(0, CANVAS - w), rng.uniform(0, CANVAS - h)
        _draw_shape(draw, rng, (x0, y0, x0 + w, y0 + h))
    return canvas


# ---------------------------------------------------------------------------------------------- views
def _perspective_coeffs(src: np.ndarray, dst: np.ndarray) -> list[float]:
    """Coefficients for PIL's PERSPECTIVE transform mapping output points ``dst`` to input points ``src``."""
    a = []
    for (x, y), (u, v) in zip(dst, src):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    return np.linalg.solve(np.asarray(a, float), src.reshape(8)).tolist()


def render_view(
    scene: Image.Image,
    rng: np.random.Generator,
    strength: float,
    size: tuple[int, int],
    zoom_out: float = 1.0,
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """A new photograph of ``scene``; ``strength`` in [0, 1] scales every change.

    ``zoom_out`` > 1 shrinks the scene inside the frame (surrounded by clutter), as for a query whose
    landmark occupies only part of the photo. Returns the image and the scene's bounding box in it.
    """
    W, H = size
    s = CANVAS
    # viewpoint: move the four corners of a (zoomed / shifted) crop of the canonical scene
    crop = rng.uniform(1.0 - 0.45 * strength, 1.0)
    cx, cy = rng.uniform(-1, 1, 2) * (1 - crop) * s / 2 + s / 2
    half = crop * s / 2
    src = np.array(
        [[cx - half, cy - half], [cx + half, cy - half], [cx + half, cy + half], [cx - half, cy + half]]
    )
    src += rng.normal(0, 0.12 * strength * s, src.shape)
    # place the scene into the frame; with zoom_out it covers only a centred-ish sub-rectangle
    fw, fh = W / zoom_out, H / zoom_out
    ox, oy = rng.uniform(0, W - fw), rng.uniform(0, H - fh)
    dst = np.array([[ox, oy], [ox + fw, oy], [ox + fw, oy + fh], [ox, oy + fh]])
    background = Image.new("RGB", (W, H), _random_colour(rng))
    warped = scene.transform(
        (W, H),
        Image.Transform.PERSPECTIVE,
        _perspective_coeffs(src, dst),
        Image.Resampling.BILINEAR,
        fillcolor=None,
    )
    mask = Image.new("L", (W, H), 0)
    ImageDraw.Draw(mask).rectangle((ox, oy, ox + fw, oy + fh), fill=255)
    img = Image.composite(warped, background, mask)
    draw = ImageDraw.Draw(img)
    if zoom_out > 1.0:  # clutter around the landmark
        for _ in range(int(rng.integers(3, 8))):
            w, h = rng.uniform(0.1, 0.3) * W, rng.uniform(0.1, 0.3) * H
            x0, y0 = rng.uniform(0, W - w), rng.uniform(0, H - h)
            if x0 > ox + fw or x0 + w < ox or y0 > oy + fh or y0 + h < oy:
                _draw_shape(draw, rng, (x0, y0, x0 + w, y0 + h))
    # clutter: occluders in front of the scene (people, cars, trees in a real photo)
    for _ in range(int(rng.poisson(2.5 * strength))):
        w, h = rng.uniform(0.08, 0.25) * W, rng.uniform(0.08, 0.35) * H
        x0, y0 = rng.uniform(0, W - w), rng.uniform(0, H - h)
        _draw_shape(draw, rng, (x0, y0, x0 + w, y0 + h))
    # light: brightness, contrast, colour cast, gamma
    arr = np.asarray(img, np.float32) / 255.0
    gain = rng.uniform(1 - 0.5 * strength, 1 + 0.3 * strength)
    contrast = rng.uniform(1 - 0.4 * strength, 1 + 0.2 * strength)
    cast = 1 + rng.uniform(-0.25, 0.25, 3) * strength
    arr = ((arr - 0.5) * contrast + 0.5) * gain * cast
    arr = np.clip(arr, 0, 1) ** rng.uniform(1 - 0.3 * strength, 1 + 0.5 * strength)
    arr = arr + rng.normal(0, 0.01 + 0.03 * strength, arr.shape)
    img = Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8), "RGB")
    if rng.random() < 0.5 * strength:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return img, (float(ox), float(oy), float(ox + fw), float(oy + fh))


# --------------------------------------------------------------------------------------------- writing
def _image_id(seed: int, split: str, cls: int, k: int) -> str:
    return hashlib.md5(f"{seed}/{split}/{cls}/{k}".encode()).hexdigest()[:16]


def _view_size(rng: np.random.Generator, longer: int) -> tuple[int, int]:
    # mixed aspect ratios (landscape, portrait, square), as in real photo collections
    aspect = float(rng.choice([1.0, 4 / 3, 3 / 4, 3 / 2]))
    return (longer, round(longer / aspect)) if aspect >= 1 else (round(longer * aspect), longer)


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=90)


def _write_train(spec: SyntheticSpec, root: Path) -> None:
    lines, train_rows = [], []
    for cls in range(spec.train_classes):
        rng = np.random.default_rng([spec.seed, 0, cls])
        scene = render_scene(rng)
        landmark_id = 1000 + 7 * cls + int(rng.integers(0, 7))  # sparse ids, so relabelling is exercised
        ids = []
        for k in range(spec.images_per_class):
            img, _ = render_view(
                scene, rng, strength=rng.uniform(0.2, 1.0), size=_view_size(rng, spec.image_size)
            )
            image_id = _image_id(spec.seed, "train", cls, k)
            _save(img, root / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg")
            ids.append(image_id)
            train_rows.append(f"{image_id},synthetic://{image_id},{landmark_id}")
        lines.append(f"{landmark_id},{' '.join(ids)}")
    (root / "train_clean.csv").write_text("landmark_id,images\n" + "\n".join(lines) + "\n")
    (root / "train.csv").write_text("id,url,landmark_id\n" + "\n".join(train_rows) + "\n")


def _write_heldout(spec: SyntheticSpec, out: Path, name: str) -> None:
    """Revisited-format split of unseen classes: 1 query per class, easy/hard/junk database views."""
    imlist: list[str] = []
    qimlist: list[str] = []
    gnd: list[dict] = []
    jpg = out / "jpg"
    for cls in range(spec.heldout_classes):
        rng = np.random.default_rng([spec.seed, 1, cls])
        scene = render_scene(rng)
        easy, hard, junk = [], [], []
        for k in range(spec.heldout_db_per_class):
            # first half mild changes (easy), second half strong ones (hard); the last view is a tiny crop in
            # heavy clutter, where the landmark is barely identifiable (junk: counts neither way)
            if k == spec.heldout_db_per_class - 1:
                img, _ = render_view(scene, rng, 1.0, _view_size(rng, spec.image_size), zoom_out=3.0)
                target = junk
            else:
                is_hard = k >= spec.heldout_db_per_class // 2
                strength = rng.uniform(0.75, 1.0) if is_hard else rng.uniform(0.1, 0.35)
                img, _ = render_view(scene, rng, strength, _view_size(rng, spec.image_size))
                target = hard if is_hard else easy
            name_k = f"c{cls:03d}_db{k}"
            _save(img, jpg / f"{name_k}.jpg")
            target.append(len(imlist))
            imlist.append(name_k)
        q, bbx = render_view(scene, rng, 0.3, _view_size(rng, spec.image_size), zoom_out=1.6)
        q_name = f"c{cls:03d}_query"
        _save(q, jpg / f"{q_name}.jpg")
        qimlist.append(q_name)
        gnd.append({"bbx": list(bbx), "easy": easy, "hard": hard, "junk": junk})
    for d in range(spec.heldout_distractors):
        rng = np.random.default_rng([spec.seed, 2, d])
        img, _ = render_view(render_scene(rng), rng, rng.uniform(0.1, 1.0), _view_size(rng, spec.image_size))
        _save(img, jpg / f"distractor_{d:03d}.jpg")
        imlist.append(f"distractor_{d:03d}")
    with open(out / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f, protocol=4)


HELDOUT_NAME = "synthetic-heldout"


def ensure_synthetic_landmarks(root: str | os.PathLike, **spec_kwargs) -> Path:
    """Write the dataset under ``root`` unless an identical one is already there; return ``root``.

    Written into a temporary sibling folder and renamed into place, so an interrupted generation never
    leaves a half-written dataset that later runs would trust. ``root/heldout`` holds the Revisited split.
    """
    spec = SyntheticSpec(**spec_kwargs)
    root = Path(root)
    stamp = root / "SPEC.json"
    if stamp.exists():
        if json.loads(stamp.read_text()).get("fingerprint") == spec.fingerprint():
            return root
        raise FileExistsError(
            f"{root} holds a synthetic dataset made with other settings ({stamp}); "
            f"delete it or choose another data.root"
        )
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log.info("generating the synthetic landmarks dataset in %s (seed %d)", root, spec.seed)
    _write_train(spec, tmp)
    (tmp / "heldout").mkdir()
    _write_heldout(spec, tmp / "heldout", HELDOUT_NAME)
    (tmp / "SPEC.json").write_text(json.dumps({"fingerprint": spec.fingerprint(), **asdict(spec)}, indent=1))
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first (e.g. DDP ranks): keep theirs if identical
        shutil.rmtree(tmp, ignore_errors=True)
        if not stamp.exists():
            raise
    return root


def main() -> None:  # python -m dalg.data.synthetic <root> [seed]
    import sys

    root = ensure_synthetic_landmarks(sys.argv[1], seed=int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    print(f"synthetic landmarks in {root}")


if __name__ == "__main__":
    main()
