"""tune-losses recipes: ``tune run recipes/<name>.py --config ...`` from the repository root.

``tune run`` imports a recipe given by path as the module ``recipes.<name>``, and torchtune installs a
top-level package also named ``recipes``. This file makes ours a regular package: with the repository
root ahead of site-packages on the import path (scripts/setup_env.sh writes a ``.pth`` file for that),
``recipes.<name>`` resolves here. Without it, ours would be a namespace package and torchtune's regular
one would win. The training code itself lives in :mod:`tune_losses.training`.
"""
