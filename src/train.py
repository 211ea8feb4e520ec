"""Train a retrieval model.  python src/train.py [model=dalg_cross] [data=gldv2 data.root=...] [-m sweeps]"""

import hydra
from omegaconf import DictConfig

import dalg.utils.config  # noqa: F401  (registers ${repo_root:})
from dalg.train_pipeline import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    result = train(cfg)
    metric = cfg.get("optimized_metric")
    return result["metrics"].get(metric) if metric else None  # what Hydra sweepers (Optuna) maximise


if __name__ == "__main__":
    main()
