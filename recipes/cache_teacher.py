"""Run a teacher once over a dataset and write its top-k / sampled log-probabilities to a cache.

    tune run recipes/cache_teacher.py --config configs/tiny/cache_teacher.yaml
    tune run --nproc_per_node 2 recipes/cache_teacher.py --config configs/tiny/cache_teacher.yaml

The cache (``output_dir``; format in docs/teacher_cache.md) is what recipes/kd_offline_*.py read as
``teacher_cache``. Rerun the same command after a kill: complete shards are kept.
"""

import sys

from omegaconf import DictConfig
from torchtune import config

from tune_losses.training.cache_teacher import run_cache_teacher


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run_cache_teacher(cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
