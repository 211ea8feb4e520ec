"""Train a retrieval model.  python src/train.py [model=dalg_cross] [data=gldv2 data.root=...] [-m sweeps]"""

import hydra
from omegaconf import DictConfig

import dalg.sweeps.job_names  # noqa: F401  (registers ${job_tag:}, the short job folder names of -m sweeps)
import dalg.utils.config  # noqa: F401  (registers ${repo_root:})
from dalg.train_pipeline import objective, train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    result = train(cfg)
    # what Hydra sweepers (Optuna) maximise: the best validation's value (the best checkpoint's), not the last
    return objective(result, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
