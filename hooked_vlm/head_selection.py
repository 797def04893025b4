"""Choosing heads from per-head scores of a sweep: the heads that stand out (NOTICE's mean + k std)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from .arguments import strict


@strict
def select_heads(scores: Float[Tensor, "*examples n_layers n_heads"], k_std: float = 2.0
                 ) -> list[tuple[int, int]]:
    """Heads whose mean |score| (over leading example dimensions) is at least mean + k_std * std over all heads
    (NOTICE's selection of important heads), as (layer, head), strongest first."""
    if not isinstance(scores, Tensor) or scores.ndim < 2 or not scores.numel():
        raise ValueError(f"scores must be a non-empty [..., n_layers, n_heads] tensor, got "
                         f"{tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__}")
    if not torch.isfinite(scores).all():
        raise ValueError(f"scores hold {int((~torch.isfinite(scores)).sum())} NaN or infinite values: select from "
                         "finite scores (layers without that attention are NaN; drop them or use torch.nan_to_num)")
    magnitude = scores.abs()
    while magnitude.ndim > 2:
        magnitude = magnitude.mean(0)
    if magnitude.numel() < 2 or bool((magnitude == magnitude.flatten()[0]).all()):
        raise ValueError(f"every head has the same mean |score| ({magnitude.flatten()[0].item():.6g}), so none "
                         "stands out: check that the sweep measured an effect (scores.std() is 0)")
    threshold = magnitude.mean() + k_std * magnitude.std()
    layers, heads = torch.nonzero(magnitude >= threshold, as_tuple=True)
    order = magnitude[layers, heads].argsort(descending=True)
    return [(int(layers[i]), int(heads[i])) for i in order]
