"""Training recipes for FG-SGD: timm-style scripts, configs of the paper's experiments.

Run from the repository root: ``python recipes/train.py`` (or ``python -m recipes.train``).
Importing :mod:`recipes.models` registers the CIFAR ResNets with timm.
"""
