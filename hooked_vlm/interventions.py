"""Interventions as hook lists: pass them to `run_with_hooks`, `hooks()` or `generate(fwd_hooks=...)`.

Head interventions act on the per-head values `hook_z` ([B, T, H, d_head], before the output projection), in the
self- (`attention="attn"`) or cross-attention of any tower.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from .hooks import HookSpec
from .models.base import HookedVLM

Head = tuple[int, int]  # (layer, head)
AblationMode = Literal["zero", "mean", "mean_of_others", "resample"]


def _z_name(model: HookedVLM, tower: str, attention: str, layer: int) -> str:
    name = f"{tower}.blocks.{layer}.{attention}.hook_z"
    model.hook_names(name)  # raises with the closest names if the tower, layer or attention does not exist
    return name


def _by_layer(heads: Iterable[Head]) -> dict[int, list[int]]:
    layers: dict[int, list[int]] = {}
    for layer, head in heads:
        layers.setdefault(int(layer), []).append(int(head))
    return layers


def ablate_heads(model: HookedVLM, heads: Iterable[Head], *, mode: AblationMode = "zero", tower: str = "lm",
                 attention: Literal["attn", "cross_attn"] = "attn", means: Mapping[str, Tensor] | None = None,
                 seed: int = 0) -> list[HookSpec]:
    """Hooks that replace the given heads' values at every position.

    Modes:
        zero: by 0.
        mean: by a dataset mean of that head's values, from `means[hook name]` ([H, d_head], or [T, H, d_head] per
            position), as `analysis.mean_activation` computes it.
        mean_of_others: by the mean of the other heads of the same layer at the same position (V-SEAM's "mean").
        resample: by the values of another example of the batch (a seeded permutation without fixed points).
    """
    if mode not in ("zero", "mean", "mean_of_others", "resample"):
        raise ValueError(f"mode must be zero, mean, mean_of_others or resample, got {mode!r}")
    hooks = []
    for layer, idx in _by_layer(heads).items():
        name = _z_name(model, tower, attention, layer)
        if mode == "mean":
            if means is None or name not in means:
                raise ValueError(f"mode='mean' needs means[{name!r}]: compute it with analysis.mean_activation")
        hooks.append((name, _ablation_hook(idx, mode, None if means is None else means.get(name), seed)))
    return hooks


def _ablation_hook(idx: list[int], mode: str, mean: Tensor | None, seed: int):
    def hook(z: Tensor, hook: Any) -> Tensor:
        z = z.clone()
        if mode == "zero":
            z[:, :, idx] = 0
        elif mode == "mean":
            m = mean.to(z.device, z.dtype)
            z[:, :, idx] = (m[idx] if m.ndim == 2 else m[: z.shape[1], idx]).expand_as(z[:, :, idx])
        elif mode == "mean_of_others":
            H = z.shape[2]
            if H < 2:
                raise ValueError("mean_of_others needs at least two heads")
            total = z.sum(dim=2, keepdim=True)
            z[:, :, idx] = (total - z[:, :, idx]) / (H - 1)
        else:  # resample
            B = z.shape[0]
            if B < 2:
                raise ValueError("resample needs a batch of at least two examples to draw from")
            generator = torch.Generator().manual_seed(seed)
            perm = (torch.arange(B) + torch.randint(1, B, (1,), generator=generator)) % B  # no fixed point
            z[:, :, idx] = z[perm.to(z.device)][:, :, idx]
        return z

    return hook


def scale_heads(model: HookedVLM, factors: Mapping[Head, float], *, tower: str = "lm",
                attention: Literal["attn", "cross_attn"] = "attn") -> list[HookSpec]:
    """Hooks that multiply the given heads' values by their factors (V-SEAM's rescaling)."""
    by_layer: dict[int, dict[int, float]] = {}
    for (layer, head), factor in factors.items():
        by_layer.setdefault(int(layer), {})[int(head)] = float(factor)
    hooks = []
    for layer, head_factors in by_layer.items():
        name = _z_name(model, tower, attention, layer)

        def hook(z: Tensor, hook: Any, head_factors: dict[int, float] = head_factors) -> Tensor:
            scale = torch.ones(z.shape[2], dtype=z.dtype, device=z.device)
            scale[list(head_factors)] = torch.tensor(list(head_factors.values()), dtype=z.dtype, device=z.device)
            return z * scale[:, None]

        hooks.append((name, hook))
    return hooks
