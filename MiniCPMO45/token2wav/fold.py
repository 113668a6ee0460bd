"""Fold weight-norm parametrizations into plain weights (inference only).

`torch.nn.utils.parametrizations.weight_norm` recomputes g * v / ||v|| on every forward; the vocoders are
read-only after loading, so the product is computed once and stored as an ordinary parameter.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize


def fold_weight_norms(module: nn.Module) -> int:
    """Replace every parametrized tensor in `module` by its current value; returns how many were folded."""
    folded = 0
    for sub in module.modules():
        if not parametrize.is_parametrized(sub):
            continue
        for name in list(sub.parametrizations.keys()):
            parametrize.remove_parametrizations(sub, name, leave_parametrized=True)
            folded += 1
    return folded


def has_parametrizations(module: nn.Module) -> bool:
    return any(parametrize.is_parametrized(sub) for sub in module.modules())
