"""Corruptions of activations by noise: a seeded Gaussian offset (ROME's causal tracing) added by a hook."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..hooks import HookSpec


def gaussian_noise(values: Tensor, scale: float, *, sites: Tensor | None = None, seed: int = 0) -> Tensor:
    """A seeded Gaussian draw shaped like `values` ([B, T, ...]), `scale` times the empirical standard deviation of
    `values` at `sites` ([B, T] bool; None: everywhere), and zero off the sites. Draw it once and add it in every
    cell of a sweep, so that the cells are comparable and the run is reproducible."""
    mask = torch.ones(values.shape[:2], dtype=torch.bool) if sites is None else sites.bool()
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"scale={scale!r}: pass a positive number of standard deviations (e.g. 3.0)")
    if not mask.any():
        raise ValueError("no site to add noise to (sites is all False): select at least one position to corrupt")
    mask = mask.to(values.device).reshape(*mask.shape, *([1] * (values.ndim - 2))).expand_as(values)
    std = values[mask].float().std()
    if scale and (not torch.isfinite(std) or std == 0):
        raise ValueError(f"the values to corrupt have standard deviation {std.item()}, so noise scaled by it is "
                         f"{'zero' if std == 0 else 'not a number'}: corrupt more than one value, and finite ones")
    draw = torch.randn(values.shape, generator=torch.Generator().manual_seed(seed)).to(values.device, values.dtype)
    return torch.where(mask, draw * (scale * std).to(values.dtype), torch.zeros_like(draw))


def add_hook(hook_name: str, offset: Tensor) -> HookSpec:
    """A hook adding `offset` [B, ...] to an activation; a batch of n stacked copies of the B examples (as in a
    patching sweep) gets the offset repeated n times."""

    def hook(t: Tensor, hook: Any) -> Tensor:
        if t.shape[0] % offset.shape[0] or t.shape[1:] != offset.shape[1:]:
            raise ValueError(f"the offset for {hook_name} has shape {tuple(offset.shape)}, the activation "
                             f"{tuple(t.shape)}")
        return t + offset.to(t.dtype).repeat(t.shape[0] // offset.shape[0], *([1] * (t.ndim - 1)))

    return hook_name, hook
