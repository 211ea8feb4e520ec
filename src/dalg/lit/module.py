"""The LightningModule: trains a DALG/DOLG network with a margin head and extracts descriptors for evaluation."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from dalg.factory import instantiate_model
from dalg.inference import InferenceOptions, optimize_for_inference
from dalg.lit.checkpoint_read import CheckpointError, read_checkpoint
from dalg.lit.ema import ema_shadow
from dalg.lit.optim import build_optimizer, warmup_cosine
from dalg.models.multiscale import ScaleResize, check_scales, effective_scales
from dalg.models.pretrained import without_weight_source
from dalg.utils.input_config import InputConfig, checkpoint_input_config

# Which weights of a training checkpoint evaluation uses: "auto" = the EMA average when the run kept one (what its
# validations measured, and so what chose its best checkpoint), else the raw weights; "ema" requires the average.
WEIGHT_CHOICES = ("auto", "ema", "raw")


class RetrievalModule(pl.LightningModule):
    """``net`` is built from ``model_cfg`` (a resolved ``cfg.model``), so a checkpoint alone rebuilds it.

    Validation batches are ``(images, index)`` from Revisited-format sets: ``validation_step`` returns their
    descriptors and the retrieval callback ranks and scores them at the end of the epoch.
    """

    weights_source = "raw"  # "ema" once from_checkpoint_dict loaded a checkpoint's EMA average into ``net``

    def __init__(
        self,
        model_cfg: Mapping[str, Any],
        num_classes: int,
        optimizer: Mapping[str, Any],
        weight_decay: float = 1e-4,
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.0,
        layer_decay: float | None = None,
        eval_scales: Sequence[float] | None = None,
        input_config: Mapping[str, Any] | None = None,
        no_decay_bias_norm: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = instantiate_model(model_cfg, num_classes)
        self.eval_scales = tuple(eval_scales) if eval_scales else None
        if input_config is not None:  # rebuilt from a checkpoint: the values the network was trained with
            self.net.input_config = InputConfig.from_mapping(input_config, where="input_config")
        # stored in every checkpoint, so that evaluation normalises and resizes as training did
        self.hparams["input_config"] = self.net.input_config.to_dict()

    @property
    def input_config(self) -> InputConfig:
        """Mean/std, interpolation and size multiple of the network's inputs (dalg.utils.input_config)."""
        return self.net.input_config

    @property
    def test_scales(self) -> tuple[float, ...]:
        """The scales evaluation extracts at: ``eval_scales`` when set, else the network's own."""
        return effective_scales(self.eval_scales, self.net)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    # ------------------------------------------------------------------------------------------ training
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        desc = self.net(images)
        logits = self.net.head(desc, labels)
        loss = F.cross_entropy(logits, labels)
        if not torch.isfinite(loss):
            self._raise_non_finite(loss, desc, logits)
        with torch.no_grad():
            acc = (self.net.head(desc.detach()).argmax(1) == labels).float().mean()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(labels))
        self.log("train/acc", acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def _raise_non_finite(self, loss: torch.Tensor, desc: torch.Tensor, logits: torch.Tensor) -> None:
        """Stop before the optimiser step: the weights stay as they were, and no checkpoint is written after this."""
        bad = [n for n, p in self.net.named_parameters() if not torch.isfinite(p).all()]
        terms = {
            "loss (margin softmax cross-entropy)": loss.item(),
            "non-finite descriptors": int((~torch.isfinite(desc)).any(1).sum()),
            "non-finite logits": int((~torch.isfinite(logits)).sum()),
            "largest finite |logit|": float(logits[torch.isfinite(logits)].abs().max())
            if torch.isfinite(logits).any()
            else float("nan"),
        }
        where = f"epoch {self.current_epoch}, global step {self.global_step}"
        detail = "; ".join(f"{k} = {v}" for k, v in terms.items())
        params = f"; non-finite weights already in {bad[:3]}" if bad else ""
        written = [
            c.last_model_path for c in self.trainer.checkpoint_callbacks if getattr(c, "last_model_path", "")
        ]
        ckpt = (
            max(written, key=lambda p: os.path.getmtime(p) if os.path.exists(p) else 0)
            if written
            else "none written yet"
        )
        raise FloatingPointError(
            f"non-finite training loss at {where}: {detail}{params}. Training stopped; "
            f"the last good checkpoint is untouched ({ckpt})."
        )

    # ---------------------------------------------------------------------------------------- evaluation
    def validation_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        images, index = batch
        if dataloader_idx == self._classification_val_index():
            self._classification_val_step(images, index)
            return None
        extractor = getattr(self, "_extractor", None) or self.net
        return {"descriptors": extractor.extract(images, self.test_scales).float(), "index": index}

    def _classification_val_index(self) -> int | None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "classification_val_index", None)

    def _classification_val_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Held-out images of the training classes (``data.val_fraction``): the training loss (with its
        margin) and top-1 accuracy, to see over-fitting that the retrieval mAP of unseen classes may hide."""
        desc = self.net(images)
        loss = F.cross_entropy(self.net.head(desc, labels), labels)
        acc = (self.net.head(desc).argmax(1) == labels).float().mean()
        for name, value in (("val/cls_loss", loss), ("val/cls_acc", acc)):
            self.log(
                name, value, on_epoch=True, batch_size=len(labels), add_dataloader_idx=False, sync_dist=True
            )

    @classmethod
    def for_evaluation(
        cls,
        ckpt_path: str | os.PathLike,
        scales: Sequence[float] | None = None,
        inference: Mapping[str, Any] | InferenceOptions | None = None,
        scale_resize: Mapping[str, Any] | None = None,
        weights: str = "auto",
    ) -> RetrievalModule:
        """A checkpoint ready for src/eval.py and src/extract.py: eval mode, optional test ``scales`` and
        ``inference`` options (dalg.inference.InferenceOptions fields: bf16, channels_last, compile), and
        optionally another per-scale resize rule than the model's (``scale_resize``: mode, antialias).
        ``weights``: one of ``WEIGHT_CHOICES`` (the EMA average by default when the checkpoint has one).

        With ``inference`` the network is optimised in place (one copy of the weights): the module is for
        extraction only from then on.
        """
        path = Path(os.path.expanduser(str(ckpt_path)))
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist (set ckpt_path=...)")
        module = cls.from_checkpoint_dict(read_checkpoint(path), path, weights)
        if scales is not None:
            module.eval_scales = check_scales(scales, "scales")
        if scale_resize is not None:
            module.net.scale_resize = ScaleResize.from_mapping(scale_resize)
        if inference is not None:
            options = (
                inference
                if isinstance(inference, InferenceOptions)
                else InferenceOptions.from_mapping(inference)
            )
            module._extractor = optimize_for_inference(module.net, options, inplace=True)
        return module.eval()

    @classmethod
    def from_checkpoint_dict(
        cls, ckpt: Mapping[str, Any], path: str | os.PathLike, weights: str = "auto"
    ) -> RetrievalModule:
        """The module a checkpoint read by ``dalg.lit.checkpoint_read.read_checkpoint`` describes (what
        Lightning's ``load_from_checkpoint`` does, from the one safe read), with the ``weights`` chosen (see
        ``WEIGHT_CHOICES``; ``module.weights_source`` says which were loaded); errors name ``path``."""
        if weights not in WEIGHT_CHOICES:
            raise ValueError(f"weights={weights!r}: expected one of {WEIGHT_CHOICES}")
        hp = dict(ckpt["hyper_parameters"])
        hp["model_cfg"] = without_weight_source(dict(hp["model_cfg"]))  # its state dict holds every weight
        try:
            module = cls(**hp)
        except Exception as e:  # noqa: BLE001 - any config the network cannot be built from
            raise CheckpointError(
                f"checkpoint {path}: its hyper_parameters do not build a {cls.__name__}: "
                f"{type(e).__name__}: {e}"
            ) from e
        module.on_load_checkpoint(dict(ckpt))
        try:
            result = module.load_state_dict(ckpt["state_dict"], strict=False)
        except RuntimeError as e:  # tensors of another shape
            raise CheckpointError(
                f"checkpoint {path}: state_dict does not fit the model its hyper_parameters "
                f"describe: {str(e).strip()[:500]}"
            ) from e
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(
                f"checkpoint {path}: state_dict does not match the model its hyper_parameters "
                f"describe; missing {result.missing_keys[:5]}, unexpected "
                f"{result.unexpected_keys[:5]}"
            )
        module.weights_source = module._load_ema(ckpt, path, weights)
        return module

    def _load_ema(self, ckpt: Mapping[str, Any], path: str | os.PathLike, weights: str) -> str:
        """Copy the checkpoint's EMA average into ``net`` when ``weights`` asks for it; returns the source used.

        A run trained with ``callbacks=with_ema`` validates (and picks its best checkpoint by) the average, while
        the checkpoint's ``state_dict`` keeps the raw weights training resumes from: evaluating the raw weights
        would score another model than the one the run reported."""
        shadow = ema_shadow(ckpt)
        if weights == "raw" or (shadow is None and weights == "auto"):
            return "raw"
        if shadow is None:
            raise CheckpointError(
                f"checkpoint {path}: weights=ema, but it holds no EMA average (trained without callbacks=with_ema)"
            )
        own = self.net.state_dict()  # tensors sharing the parameters' storage
        bad = [
            k
            for k, v in shadow.items()
            if k not in own or not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(own[k].shape)
        ]
        if bad or not shadow:
            raise CheckpointError(
                f"checkpoint {path}: its EMA average does not fit the model (keys {bad[:5]} unknown or of "
                "another shape); evaluate the raw weights with weights=raw"
            )
        with torch.no_grad():
            for k, v in shadow.items():
                own[k].copy_(v)
        return "ema"

    @property
    def inference_label(self) -> str:
        """How descriptors are extracted, for protocol records: the resolved dalg.inference options, or the
        network's own ``extract``."""
        extractor = getattr(self, "_extractor", None)
        return extractor.options.label() if extractor is not None else "fp32 (model.extract)"

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        return self.validation_step(batch, batch_idx, dataloader_idx)

    # --------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the global RNG drives dropout/drop-path; data order and augmentation have their own (resumable_data.py)
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get("torch_rng_state")
        stored = checkpoint_input_config(
            checkpoint.get("hyper_parameters") or {}, self.net.input_config, "checkpoint"
        )
        if stored == self.net.input_config:
            return
        if self._trainer is not None and self.trainer.state.fn == "fit":
            # resuming: the data loaders already normalise with this run's config; mixing both is never right
            raise ValueError(
                f"the checkpoint to resume was trained with inputs {stored.describe()} "
                f"({stored.source}), this run's model expects {self.net.input_config.describe()}: "
                f"set model.backbone.mean={list(stored.mean)} model.backbone.std={list(stored.std)} "
                f"model.backbone.interpolation={stored.interpolation} to continue it"
            )
        self.net.input_config = (
            stored  # an older checkpoint without one: the ImageNet values it was trained with
        )
        self.hparams["input_config"] = stored.to_dict()

    def on_train_start(self) -> None:
        # Lightning 2.6 builds the training loader early when configure_optimizers reads estimated_stepping_batches
        # (before the checkpoint is restored) and then skips handing it the restored loader state (fit_loop.
        # setup_data returns early). Hand it over here and restart the iterator, so a mid-epoch resume continues
        # the epoch's data order (dalg.lit.resumable_data) instead of starting a new one.
        fit_loop = self.trainer.fit_loop
        if (
            getattr(fit_loop, "_combined_loader_states_to_load", None)
            and fit_loop._combined_loader is not None
        ):
            fit_loop._load_combined_loader_states()
            iter(fit_loop._data_fetcher)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if getattr(self, "_rng_to_restore", None) is not None:  # first step after a resume
            torch.set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    # ----------------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        factory = hydra.utils.instantiate(dict(self.hparams.optimizer), _partial_=True)
        optimizer = build_optimizer(
            factory,
            self,
            self.hparams.weight_decay,
            self.hparams.layer_decay,
            self.hparams.get("no_decay_bias_norm", True),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(round(self.hparams.warmup_epochs * total / max(1, self.trainer.max_epochs or 1)))
        warmup = min(max(1, warmup), total)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, warmup, total, self.hparams.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
