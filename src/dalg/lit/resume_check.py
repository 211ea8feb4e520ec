"""Before a training run resumes from a checkpoint: is it a checkpoint of the model this run builds?

Lightning finds out only inside ``trainer.fit`` (strict ``load_state_dict``), after the run folder's
``config.yaml`` and run metadata were rewritten for the new model. Checked first, the folder keeps describing the
model its checkpoints hold.
"""

from __future__ import annotations

import logging
import os

from torch import nn

from dalg.lit.checkpoint_read import read_checkpoint
from dalg.models.checkpoint import state_dict_differences
from dalg.retrieval.features import fingerprint_differences

log = logging.getLogger(__name__)

# hyper-parameters that define the network (the optimiser's may change on a resume)
MODEL_KEYS = ("model_cfg", "num_classes", "input_config")


def check_resume_model(ckpt_path: str | os.PathLike, module: nn.Module) -> None:
    """Raise ValueError naming the file and the differences if ``ckpt_path`` holds weights of another network
    than ``module`` (a RetrievalModule built from this run's config); log the differing model settings when the
    weights fit anyway (e.g. a changed margin: the run continues with this config)."""
    ckpt = read_checkpoint(ckpt_path)
    saved_hp = ckpt.get("hyper_parameters") or {}
    own_hp = dict(getattr(module, "hparams", {}))
    # keys only one side records (e.g. input_config in older checkpoints) say nothing about a mismatch
    keys = [k for k in MODEL_KEYS if k in saved_hp and k in own_hp]
    config_diffs = fingerprint_differences({k: saved_hp[k] for k in keys}, {k: own_hp[k] for k in keys})
    weight_diffs = state_dict_differences(ckpt["state_dict"], module.state_dict(), limit=4)
    settings = "; ".join(d.replace("model_cfg.", "model.", 1) for d in config_diffs)
    if weight_diffs:
        raise ValueError(
            f"cannot resume from {ckpt_path}: it holds another model than this run's config builds: "
            f"{'; '.join(weight_diffs)}."
            + (f" Settings that differ (checkpoint vs this run): {settings}." if settings else "")
            + " Nothing was written to the run folder. Use the checkpoint's model settings, or another "
            "run_name (or resume=never) to start a new run."
        )
    if settings:
        log.warning(
            "resuming from %s with changed model settings (checkpoint vs this run): %s; the run continues "
            "with this run's values",
            ckpt_path,
            settings,
        )
