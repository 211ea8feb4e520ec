"""W&B: who a run is (name, group, tags, job type) and what each validation adds to it.

- :func:`wandb_run_args`: the name is the run name (``<run_name>/<job folder>`` in a sweep, the folder starting
  with the job number), the group the run or sweep name, the tags the overrides that vary in the sweep
  (``model/fusion=orthogonal``), the job type the task (``train``). Values set in ``conf/logger/wandb.yaml`` win.
- :class:`WandbValidationMedia` (a callback; a no-op without a ``WandbLogger``), after each validation, in the same
  W&B step as that validation's metrics (logged with ``commit=False``; Lightning's metrics call commits the row):
  ``define_metric`` with ``summary="max,last"`` for every ``val/<set>/mAP_*`` and ``mP@*`` key, and
  ``best/val/<set>/...`` (the values at the best validation so far,
  :class:`dalg.lit.validation_history.ValidationHistory`); attention maps (spatial attention, cross-attention weights) of a few fixed queries per set; a ``wandb.Table`` per set with each query's
  AP (E/M/H), its thumbnail and its top-k thumbnails bordered by label (green positive, red negative, grey junk);
  at the end of ``fit``, optionally (``log_model``), the best checkpoint as a ``model`` artifact (offline too:
  ``wandb sync`` uploads it).

It reads the evaluation of each set from the retrieval callback's ``last_results`` (``SetResult``: scores,
ranks, paths, ground truth), so nothing is ranked twice.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from PIL import Image, ImageOps
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from dalg.lit.validation_history import ValidationHistory

log = logging.getLogger(__name__)

BORDER = {
    "positive": (30, 170, 60),
    "negative": (210, 40, 40),
    "junk": (150, 150, 150),
    "query": (40, 90, 220),
}
SETUPS = ("E", "M", "H")


def wandb_run_args(run_name: str, task_name: str, job: dict[str, Any]) -> dict[str, Any]:
    """``name``, ``group``, ``tags``, ``job_type`` of a run, from its Hydra job (:func:`current_job`)."""
    multirun = job.get("mode") == "multirun"
    folder = Path(job["folder"]).name if job.get("folder") else str(job.get("num"))
    return {
        "name": f"{run_name}/{folder}" if multirun else run_name,
        "group": run_name,
        "tags": [f"{k}={v}"[:64] for k, v in (job.get("varying") or {}).items()] if multirun else [],
        "job_type": task_name,
    }


def _wandb_run(trainer: pl.Trainer):
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            return lg.experiment
    return None


def _open(path: str, box: Any = None, size: int = 256) -> Image.Image:
    with Image.open(path) as img:
        if box is None:  # reduced-size JPEG decoding; a crop box is in full-size pixels
            img.draft("RGB", (size * 2, size * 2))
        img = img.convert("RGB")
    if box is not None:
        img = img.crop(tuple(int(round(v)) for v in box))
    img.thumbnail((size, size))
    return img


def _tile(img: Image.Image, size: int, colour: tuple[int, int, int], border: int = 4) -> Image.Image:
    inner = ImageOps.pad(img, (size - 2 * border, size - 2 * border), color=(255, 255, 255))
    return ImageOps.expand(inner, border=border, fill=colour)


def label_of(db: int, gnd: dict, setup: str) -> str:
    """positive / junk / negative of database image ``db`` for one query in setup E, M or H (protocol.md)."""
    easy, hard, junk = set(gnd.get("easy", ())), set(gnd.get("hard", ())), set(gnd.get("junk", ()))
    positives, ignored = {
        "E": (easy, junk | hard),
        "M": (easy | hard, junk),
        "H": (hard, junk | easy),
    }[setup]
    return "positive" if db in positives else "junk" if db in ignored else "negative"


def overlay(maps: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
    """The image and one jet-coloured overlay per attention map, side by side (uint8 HxWx3) and their names."""
    from matplotlib import colormaps

    rgb = maps["image"].astype(np.float32) / 255.0
    panels, names = [rgb], ["image"]
    for name, m in maps.items():
        if name == "image":
            continue
        heat = colormaps["jet"](np.clip(m, 0, 1))[..., :3]
        panels.append(0.5 * rgb + 0.5 * heat)
        names.append(name)
    return (np.concatenate(panels, axis=1) * 255).round().astype(np.uint8), names


class WandbValidationMedia(pl.Callback):
    """See the module doc. ``attention_queries``/``table_queries``: how many queries per set (evenly spaced,
    the same ones at every validation); ``top_k``/``thumb``/``setup``: the table's result thumbnails."""

    def __init__(
        self,
        attention_queries: int = 3,
        attention_size: int = 224,
        table_queries: int = 50,
        top_k: int = 5,
        thumb: int = 64,
        setup: str = "M",
        log_model: bool = False,
    ):
        if setup not in SETUPS:
            raise ValueError(f"callbacks.wandb_media.setup must be one of E, M, H, got {setup!r}")
        self.attention_queries = attention_queries
        self.attention_size = attention_size
        self.table_queries = table_queries
        self.top_k = top_k
        self.thumb = thumb
        self.setup = setup
        self.log_model = log_model
        self._defined: set[str] = set()

    # --------------------------------------------------------------------------------------- metrics
    def _define_metrics(self, run: Any, values: dict[str, float]) -> None:
        """``summary="max,last"`` for every retrieval metric, by its full name, before its first value is logged
        (wandb 0.31 applies a glob's summary only to a whole last segment, ``val/<set>/*``, which would also
        take the images logged under that prefix)."""
        for key in values:
            if key not in self._defined:
                run.define_metric(key, step_metric="trainer/global_step", summary="max,last")
                self._defined.add(key)

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = _wandb_run(trainer)
        if run is None or trainer.sanity_checking:
            return
        import wandb

        from dalg.retrieval.callback import RetrievalEvalCallback

        retrieval = next((c for c in trainer.callbacks if isinstance(c, RetrievalEvalCallback)), None)
        results = dict(getattr(retrieval, "last_results", None) or {})
        payload: dict[str, Any] = {}
        for name, res in results.items():
            if self.table_queries > 0:
                payload[f"val/{name}/per_query"] = self.query_table(res, wandb)
            images = self.attention_images(pl_module, res, wandb)
            if images:
                payload[f"val/{name}/attention"] = images
        current = {
            f"val/{name}/{k}": float(v)
            for name, scores in (getattr(retrieval, "results", None) or {}).items()
            for k, v in scores.as_dict().items()
        }
        self._define_metrics(run, current)  # Lightning logs these values after this hook
        history = next((c for c in trainer.callbacks if isinstance(c, ValidationHistory)), None)
        if history is not None and trainer.state.fn == "fit":
            payload.update({f"best/{k}": v for k, v in history.best_with(current).items()})
        if payload:
            run.log(payload, commit=False)  # committed with this validation's metrics (same step)

    # --------------------------------------------------------------------------------------- media
    def _queries(self, n: int, how_many: int) -> list[int]:
        return np.unique(np.linspace(0, n - 1, min(how_many, n)).round().astype(int)).tolist() if n else []

    def query_table(self, res: Any, wandb: Any):
        """One row per query: name, thumbnail, AP (%) in E/M/H, top-k thumbnails bordered by label."""
        columns = [
            "query",
            "image",
            *[f"AP_{s}" for s in SETUPS],
            *[f"top{i + 1}" for i in range(self.top_k)],
        ]
        table = wandb.Table(columns=columns)
        boxes = res.query_boxes or [None] * len(res.query_paths)
        for q in self._queries(len(res.query_paths), self.table_queries):
            aps = [float(res.scores.aps[s][q]) * 100 if s in res.scores.aps else float("nan") for s in SETUPS]
            query = _tile(_open(res.query_paths[q], boxes[q], self.thumb * 2), self.thumb, BORDER["query"])
            tiles = []
            for db in res.ranks[q, : self.top_k]:
                kind = label_of(int(db), res.gnd[q], self.setup)
                tile = _tile(
                    _open(res.database_paths[int(db)], None, self.thumb * 2), self.thumb, BORDER[kind]
                )
                tiles.append(wandb.Image(tile, caption=f"{Path(res.database_paths[int(db)]).stem} ({kind})"))
            tiles += [None] * (self.top_k - len(tiles))
            table.add_data(Path(res.query_paths[q]).stem, wandb.Image(query), *aps, *tiles)
        return table

    def attention_images(self, pl_module: pl.LightningModule, res: Any, wandb: Any) -> list:
        """Spatial attention and cross-attention weights over a few fixed queries (none for a model without)."""
        net = getattr(pl_module, "net", None)
        if self.attention_queries <= 0 or net is None or not hasattr(net, "forward_features"):
            return []
        from dalg.tools.attention_maps import attention_maps

        boxes = res.query_boxes or [None] * len(res.query_paths)
        images = []
        was_training = net.training
        for q in self._queries(len(res.query_paths), self.attention_queries):
            img = _open(res.query_paths[q], boxes[q], size=self.attention_size)
            maps = attention_maps(net, img, self.attention_size)
            if len(maps) < 2:  # this fusion has no attention to show
                return []
            strip, names = overlay(maps)
            # one size for every query (W&B shows a list of images of different sizes wrongly)
            box = (self.attention_size * len(names), self.attention_size)
            strip = np.asarray(ImageOps.pad(Image.fromarray(strip), box, color=(255, 255, 255)))
            images.append(wandb.Image(strip, caption=f"{Path(res.query_paths[q]).stem}: {' | '.join(names)}"))
        net.train(was_training)
        return images

    # --------------------------------------------------------------------------------------- checkpoint
    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = _wandb_run(trainer)
        ckpt = next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)
        path = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
        if not self.log_model or run is None:
            return
        if not path or not Path(path).is_file():
            log.warning("log_model: no best checkpoint to log (monitor %s)", getattr(ckpt, "monitor", None))
            return
        import wandb

        score = getattr(ckpt, "best_model_score", None)
        artifact = wandb.Artifact(
            name=f"model-{run.id}",
            type="model",
            metadata={
                "monitor": ckpt.monitor,
                "score": float(score) if score is not None else None,
                "file": Path(path).name,
                "global_step": trainer.global_step,
            },
        )
        artifact.add_file(path, name="best.ckpt")
        run.log_artifact(artifact, aliases=["best"])
